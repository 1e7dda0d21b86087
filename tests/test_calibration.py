"""One serving rule, one calibration table and one policy-directory layout for the proxy
(``velo_proxy``) and the training package (``policy/``): both sides use the same code, and the
learned policy's own rule agrees with it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from policy.baselines import decide
from policy.evaluate import calibrate
from policy.retrain import current_checkpoint
from tests.policy_builders import export_rule_policy
from velo_proxy import features as F
from velo_proxy.calibration import (DELTAS, NEVER_SERVE, SERVING_RULE, calibration_record, delta_key, serve_threshold,
                                    serving_actions)
from velo_proxy.policy import LearnedPolicy, PolicyMismatch, default_policy_path
from velo_proxy.policy_dir import CURRENT, PolicyDirectory

EMBEDDER_ID = "sentence-transformers/all-MiniLM-L6-v2"


def test_serve_threshold_takes_the_strictest_calibrated_delta_not_above_the_bound():
    calibration = {"thresholds": {"0.01": 0.9, "0.02": 0.5, "0.05": 0.3}}
    assert serve_threshold(calibration, 0.02) == 0.5
    assert serve_threshold(calibration, 0.03) == 0.5  # between two deltas: the stricter one
    assert serve_threshold(calibration, 0.5) == 0.3
    assert serve_threshold(calibration, 0.005) == NEVER_SERVE > 1.0  # below every delta: never serve


def test_one_serving_rule_for_the_proxy_and_the_simulator(tmp_path):
    path = export_rule_policy(tmp_path / "p.onnx", embedder_id=EMBEDDER_ID, version="rule")
    policy = LearnedPolicy(path, embedder_id=EMBEDDER_ID, dim=384, max_false_hit_rate=0.02)
    assert policy.threshold == 0.5
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=500).astype(np.float32)
    probs[:20, F.ACTION_B] = probs[:20, F.ACTION_C]  # ties between B and C go to B
    for has_hits in (True, False):
        served = [policy.rule(p, has_hits) for p in probs]
        shared = serving_actions(probs, policy.threshold, has_hits=np.full(len(probs), has_hits))
        assert served == shared.tolist()
    assert set(serving_actions(probs, policy.threshold).tolist()) == {F.ACTION_A, F.ACTION_B, F.ACTION_C}
    np.testing.assert_array_equal(decide(probs, policy.threshold), serving_actions(probs, policy.threshold))
    np.testing.assert_array_equal(decide(probs, None), probs.argmax(axis=1))


def test_calibration_table_is_written_and_read_with_the_same_keys():
    p_a = np.linspace(0.0, 1.0, 400)
    relevant = (p_a > 0.3).astype(float)
    thresholds = calibrate(p_a, relevant)
    assert list(thresholds) == [delta_key(d) for d in DELTAS]
    record = calibration_record(thresholds, default_delta=0.02, w=0.1)
    assert (record["format"], record["rule"], record["w"]) == (1, SERVING_RULE, 0.1)
    assert serve_threshold(record, 0.02) == thresholds["0.02"]


def test_policy_directory_layout(tmp_path):
    directory = PolicyDirectory(tmp_path / "policies")
    assert directory.current() is None and directory.checkpoint() is None
    shipped = default_policy_path().with_suffix(".pt")
    assert current_checkpoint(directory) == (shipped, "lrs-default")  # nothing published: the shipped one
    # ... the one shipped for the configured embedder; an embedder the package ships none for is refused
    e5 = current_checkpoint(directory, "intfloat/multilingual-e5-small-q4")
    assert e5 == (shipped.with_name("lrs-multilingual-e5-small.pt"), "lrs-multilingual-e5-small") and e5[0].is_file()
    with pytest.raises(PolicyMismatch, match="ships no learned policy for embedder 'sentence-transformers/all-MiniLM"):
        current_checkpoint(directory, "sentence-transformers/all-MiniLM-L6-v2-int8")

    onnx = directory.publish(b"onnx-v1", version="v1", info={"published_at": 1.0})
    assert onnx == directory.versions / "v1.onnx" and onnx.read_bytes() == b"onnx-v1"
    assert directory.current() == {"version": "v1", "file": "v1.onnx", "published_at": 1.0, "path": str(onnx)}
    assert directory.checkpoint() is None  # published without one: retraining starts from the shipped policy

    directory.publish(b"onnx-v2", version="v2", checkpoint=b"pt-v2")
    assert json.loads((directory.root / CURRENT).read_text())["checkpoint"] == "v2.pt"
    assert directory.checkpoint() == (directory.versions / "v2.pt", "v2")
    assert current_checkpoint(directory) == (directory.versions / "v2.pt", "v2")
    assert (directory.versions / "v2.pt").read_bytes() == b"pt-v2"
    assert sorted(p.name for p in directory.root.rglob("*") if p.is_file()) == [
        CURRENT, "v1.onnx", "v2.onnx", "v2.pt"]  # no temporary files left behind
    (directory.versions / "v2.pt").unlink()
    assert directory.checkpoint() is None
