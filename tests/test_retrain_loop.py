"""The whole loop, end to end: requests through a running proxy -> decisions in the Redis experience
stream -> shadow checks write rewards -> `velo-proxy retrain` reads the streams, fine-tunes, evaluates
against the current policy and publishes -> the running proxy serves with the new version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict

import httpx
import pytest
import redis

from policy.data import DataSpec
from policy.export import export_onnx
from policy.networks import make_actor
from policy.train import save_actor
from tests.test_cache import ADMIN, ask, settle
from velo_proxy import features as F
from velo_proxy import e5_export
from velo_proxy.experience import stream_key
from velo_proxy.policy import DEFAULT_POLICY_EMBEDDER_ID, PolicyDirectory

EMBEDDER_ID = DEFAULT_POLICY_EMBEDDER_ID


def publish_untrained_policy(tmp_path, embedder_id: str = EMBEDDER_ID) -> PolicyDirectory:
    """A published v0 for ``embedder_id`` whose actor is freshly initialised (a bad policy the retrain must beat)."""
    import torch

    torch.manual_seed(3)
    actor = make_actor("transformer", 384, F.K, 5)
    directory = PolicyDirectory(tmp_path / "policies")
    meta = {"arch": "transformer", "dim": 384, "k": F.K, "top_p": 5, "embedder_id": embedder_id}
    save_actor(actor, tmp_path / "v0.pt", meta)
    export_onnx(actor, tmp_path / "v0.onnx", dim=384, top_p=5, embedder_id=embedder_id, policy_version="lrs-v0",
                calibration={"format": 1, "thresholds": {"0.02": 0.2}})
    directory.publish((tmp_path / "v0.onnx").read_bytes(), version="lrs-v0",
                      checkpoint=(tmp_path / "v0.pt").read_bytes())
    assert directory.checkpoint() == (directory.versions / "lrs-v0.pt", "lrs-v0")
    return directory


@pytest.fixture()
def untrained_policy_dir(tmp_path):
    return publish_untrained_policy(tmp_path)


@pytest.mark.parametrize("embedder", ["all-MiniLM-L6-v2", "multilingual-e5-small"])
def test_experience_to_retrain_to_hot_reload(embedder, make_proxy, embedder_dir, redis_server, test_data, tmp_path,
                                             request):
    """Each embedder's proxies log their own vectors and the retrain job, configured with the same embedder,
    fine-tunes that embedder's policy on them (e5: the chart's config.embedder=multilingual-e5-small)."""
    if embedder == "all-MiniLM-L6-v2":
        model_dir, embedder_id = embedder_dir, EMBEDDER_ID
    else:
        model_dir = request.getfixturevalue("e5_embedder_dir")
        embedder_id = e5_export.embedder_id(e5_export.DEFAULT_PRECISION)
    untrained_policy_dir = publish_untrained_policy(tmp_path, embedder_id)
    pairs = json.loads((test_data / "pairs" / "gptcache-mock-paraphrases.json").read_text())[:24]
    proxy = make_proxy(policy="learned", policy_dir=untrained_policy_dir.root, policy_reload_s=0.2,
                       redis_url=redis_server.url, agent_id="edge-a", admin_key=ADMIN, shadow_rate=1.0,
                       exploration_rate=0.3, embedder=embedder, embedder_dir=model_dir)
    for pair in pairs:
        _, headers = ask(proxy, pair["origin"])
        assert headers["x-velo-policy"] == "lrs-v0"
    settle(proxy)
    for pair in pairs:
        ask(proxy, pair["similar"])
    settle(proxy, timeout_s=30)

    entries = [f for _, f in redis.Redis.from_url(redis_server.url, decode_responses=True).xrange(stream_key("edge-a"))]
    decisions = [e for e in entries if e["kind"] == "decision"]
    rewards = [e for e in entries if e["kind"] == "reward" and e["source"] == "shadow"]
    assert len(decisions) >= 40 and rewards, "decisions and shadow rewards reached the stream"
    assert {d["embedder"] for d in decisions} == {embedder_id}  # whose vectors the observations hold

    spec = json.dumps({k: v for k, v in asdict(DataSpec.tiny()).items() if k != "split_fractions"})
    command = [sys.executable, "-m", "velo_proxy", "retrain", "--redis-url", redis_server.url,
               "--policy-dir", str(untrained_policy_dir.root), "--data-spec", spec, "--epochs", "15",
               "--demo-steps", "300", "--eval-steps", "400", "--min-decisions", "5"]
    env = {**os.environ, "PYTHONHASHSEED": "0", "VELO_EMBEDDER": embedder, "VELO_EMBEDDER_DIR": str(model_dir)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert report["decisions"] >= 40 and report["logged_with_reward"] >= 5
    assert (report["embedder"], report["decisions_of_other_embedders"]) == (embedder_id, 0)
    assert report["inputs"]["embedder_dir"] == str(model_dir)
    evaluation = report["evaluation"]
    better_sim = evaluation["candidate"]["sim_reward"] > evaluation["current"]["sim_reward"]
    logs_ok = not evaluation["candidate"]["logged_value"] < evaluation["current"]["logged_value"] - 1e-6
    better = better_sim and logs_ok
    # published exactly when better on the simulator's test split and no worse on the logged decisions. On
    # the tiny data's benchmark-shaped streams neither actor serves a semantic hit at the calibrated bound and
    # they differ only in B vs C, where the retrained one was measured both no better (-6.344 vs -6.295) and
    # better on the simulator (-6.259 vs -6.295) but worse on the logs; both outcomes must be right.
    assert report["published"] is better, json.dumps(report, default=str)
    if not better:
        assert report["reason"] == ("not better on the simulator's test split" if not better_sim
                                    else "worse than the current policy on the logged data")
        assert untrained_policy_dir.current()["version"] == "lrs-v0"  # nothing published, nothing changed
        _, headers = ask(proxy, "Is the old policy still in use?", headers={"cache-control": "no-store"})
        assert headers["x-velo-policy"] == "lrs-v0"
        return
    assert report["parity"] <= 1e-5
    pointer = untrained_policy_dir.current()
    assert pointer["version"] == report["version"] and pointer["retrained_from"] == "lrs-v0"
    # the next retrain starts from this version's checkpoint, published next to it
    assert untrained_policy_dir.checkpoint() == (untrained_policy_dir.versions / f"{report['version']}.pt",
                                                 report["version"])

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        _, headers = ask(proxy, "Is the new policy in use yet?", headers={"cache-control": "no-store"})
        if headers["x-velo-policy"] == report["version"]:
            break
        time.sleep(0.2)
    assert headers["x-velo-policy"] == report["version"]
    assert f'velo_policy_info{{version="{report["version"]}"}} 1.0' in httpx.get(f"{proxy.url}/metrics").text


def test_retrain_without_enough_experience_publishes_nothing(redis_server, untrained_policy_dir):
    done = subprocess.run([sys.executable, "-m", "velo_proxy", "retrain", "--redis-url", redis_server.url,
                           "--policy-dir", str(untrained_policy_dir.root)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert report["published"] is False and "logged decisions" in report["reason"]
    assert untrained_policy_dir.current()["version"] == "lrs-v0"


def test_logged_decisions_of_another_feature_contract_or_embedder_are_left_out():
    """An older proxy logged observations with fewer hit features (feature version 2: K = 10); retraining on
    the current contract takes only decisions whose K matches instead of failing to stack them. A proxy that
    embeds with another embedder logs vectors of the same size from another space (e5's and MiniLM's are
    both 384-d): retraining one embedder's policy leaves them out, and those of a proxy that did not say."""
    import numpy as np

    from policy.retrain import logged_dataset
    from policy.sim import QoSConfig
    from velo_proxy.experience import encode_observation

    rng = np.random.default_rng(0)

    minilm, e5 = "sentence-transformers/all-MiniLM-L6-v2", "intfloat/multilingual-e5-small-q4"

    def decision(k: int, request_id: str, embedder: str | None = minilm) -> dict:
        obs = F.Observation(rng.standard_normal(384).astype(np.float32), rng.standard_normal((5, 384)).astype(np.float32),
                            rng.standard_normal((5, k)).astype(np.float32), np.array([1, 0, 0, 0, 0], np.float32))
        return {"request_id": request_id, "agent": "a", "action": "B", "prob": "1.0", "rewards": [-0.5],
                "delay_s": "3.0", "obs": encode_observation(obs), "dim": "384", "top_p": "5", "k": str(k),
                **({"embedder": embedder} if embedder else {})}

    decisions = [decision(F.K - 1, "old"), decision(F.K, "new"), decision(F.K, "new2"), decision(F.K, "e5", e5),
                 decision(F.K, "unsaid", None)]
    logged = logged_dataset(decisions, qos=QoSConfig(), b_satisfaction=-0.5, embedder_id=minilm)
    assert logged is not None and len(logged.action) == 2
    assert logged.obs["hit_features"].shape == (2, 5, F.K)
    only_e5 = logged_dataset(decisions, qos=QoSConfig(), b_satisfaction=-0.5, embedder_id=e5)
    assert only_e5 is not None and len(only_e5.action) == 1
    assert logged_dataset([decision(F.K - 1, "old")], qos=QoSConfig(), b_satisfaction=-0.5, embedder_id=minilm) is None
