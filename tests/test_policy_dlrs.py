"""DLRS's diffusion actor (policy.networks.DiffusionActor): its mechanics, a tiny training run through the
same entry point as LRS, a checkpoint round trip with the variant's options, and the export of the
unrolled denoising loop to one ONNX graph that the proxy's learned policy serves."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from policy.export import export_onnx, parity  # noqa: E402
from policy.networks import DiffusionActor, cosine_alpha_bar, make_actor  # noqa: E402
from policy.sim import SimConfig  # noqa: E402
from policy.train import ARCH_OPTIONS, METHODS, TrainConfig, actor_meta, load_actor, save_actor, train  # noqa: E402
from velo_proxy import features as F  # noqa: E402


def inputs(batch: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(batch, 384, generator=g), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(batch, 5, 384, generator=g), dim=-1)
    feats = torch.rand(batch, 5, F.K, generator=g)
    mask = torch.ones(batch, 5)
    mask[0] = 0  # no hits: only B is possible
    mask[1, 2:] = 0
    return u, v, feats, mask


def test_schedule_runs_from_clean_to_noise():
    abar = cosine_alpha_bar(10)
    assert abar.shape == (11,) and abar[0] == pytest.approx(1.0) and abar[-1] < 0.01
    assert bool((abar[1:] < abar[:-1]).all())


def test_serving_is_the_deterministic_mean_path_and_training_is_noisy():
    torch.manual_seed(0)
    actor = DiffusionActor(384, F.K, 5, steps=10, noise_scale=1.0)
    x = inputs()
    actor.eval()
    with torch.no_grad():
        a, b = actor(*x), actor(*x)
    assert torch.equal(a, b)
    probs = torch.softmax(a, -1)
    assert probs[0, 0] < 1e-6 and probs[0, 2] < 1e-6 and probs[0, 1] == pytest.approx(1.0)  # no hit: B
    actor.train()
    with torch.no_grad():
        c, d = actor(*x), actor(*x)
    assert not torch.allclose(c[1:], d[1:]), "the noise at x_T reaches the logits while training"
    quiet = DiffusionActor(384, F.K, 5, steps=10, noise_scale=0.0).train()
    with torch.no_grad():
        assert torch.equal(quiet(*x), quiet(*x))


def test_gradients_reach_the_encoder_and_the_denoiser_through_the_chain():
    actor = DiffusionActor(384, F.K, 5, steps=5)
    logits = actor(*inputs())
    torch.log_softmax(logits, -1)[1:, 0].sum().backward()
    assert actor.denoiser[0].weight.grad.abs().sum() > 0
    assert actor.layers[0].qkv.weight.grad.abs().sum() > 0 and actor.tokens.hit[1].weight.grad.abs().sum() > 0


def test_the_paper_variants_are_methods_with_their_knobs():
    assert {"dlrs", "dlrs-l5", "dlrs-l15", "dlrs-v5", "dlrs-v10", "dlrs-v15"} <= set(METHODS)
    assert all(METHODS[m] == ("diffusion", True) for m in ARCH_OPTIONS)
    assert ARCH_OPTIONS["dlrs-l5"]["steps"] == 5 and ARCH_OPTIONS["dlrs-v15"]["noise_scale"] == 1.5
    assert make_actor("diffusion", 384, F.K, 5, **ARCH_OPTIONS["dlrs-l15"]).steps == 15


@pytest.mark.parametrize("steps", [5, 10])
def test_export_unrolls_the_denoising_loop_with_parity(tmp_path, steps):
    torch.manual_seed(1)
    actor = DiffusionActor(384, F.K, 5, steps=steps)
    path = tmp_path / "dlrs.onnx"
    cal = {"default_delta": 0.02, "rule": "serve_a_if_p_a_at_least", "thresholds": {"0.02": 0.9}}
    export_onnx(actor, path, dim=384, top_p=5, embedder_id="e", policy_version="dlrs-test", calibration=cal)
    assert parity(actor, path, dim=384, top_p=5) <= 1e-5
    graph = onnx.load(str(path)).graph
    assert not any(node.op_type in ("Loop", "RandomNormal", "RandomNormalLike") for node in graph.node)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["velo_calibration"]) == cal and meta["velo_feature_version"] == str(F.FEATURE_VERSION)


def test_a_tiny_dlrs_run_trains_saves_loads_and_is_served(tiny_data, tmp_path):
    """Through the same ``train`` as LRS; the checkpoint carries the variant's options; the exported actor is
    served by the proxy's LearnedPolicy with the same probabilities."""
    from velo_proxy.policy import LearnedPolicy

    cfg = TrainConfig(method="dlrs-l5", updates=2, rollout_steps=32, eval_every=2, eval_steps=40, threads=1,
                      demo_steps=200, neighbour_demos=100, demo_pretrain_epochs=1,
                      sim=SimConfig(episode_len=96, capacity=200))
    actor, history = train(tiny_data, cfg, progress=False)
    assert isinstance(actor, DiffusionActor) and actor.steps == 5 and history
    ckpt = tmp_path / "dlrs.pt"
    save_actor(actor, ckpt, actor_meta("dlrs-l5", dim=tiny_data.dim, top_p=5, embedder_id=tiny_data.embedder_id))
    loaded, meta = load_actor(ckpt)
    assert meta["arch"] == "diffusion" and meta["arch_options"] == {"steps": 5, "noise_scale": 1.0}
    x = inputs()
    actor.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(*x), actor(*x))
    path = tmp_path / "dlrs.onnx"
    export_onnx(loaded, path, dim=tiny_data.dim, top_p=5, embedder_id=tiny_data.embedder_id,
                policy_version="dlrs-tiny", calibration={"format": 1, "thresholds": {"0.02": 0.5}})
    served = LearnedPolicy(path, embedder_id=tiny_data.embedder_id, dim=tiny_data.dim, max_false_hit_rate=0.02)
    batch = {k: v.numpy() for k, v in zip(F.INPUT_NAMES, x)}
    obs = [F.Observation(**{k: batch[k][i] for k in F.INPUT_NAMES}) for i in range(len(x[0]))]
    with torch.no_grad():
        ref = torch.softmax(loaded(*x), -1).numpy()
    np.testing.assert_allclose(served.probs(obs), ref, atol=1e-5)
    assert served.version == "dlrs-tiny"


def test_the_reproduce_stage_reports_pairs_costs_and_keeps_its_section(tmp_path):
    """policy.reproduce_dlrs: the section pairs every DLRS row with LRS on the same streams, times the
    exported actors, and lives between markers that a rewrite of the rest of the page keeps."""
    from policy.reproduce import EDGES, MODES
    from policy.reproduce_dlrs import (BEGIN, DIFFUSION, END, decision_ms, existing_section, imitation_and_ppo,
                                       replace_section, section)

    rng = np.random.default_rng(0)
    names = ["LRS", "LRS (δ=0.02)", "DLRS", "DLRS-L5", "DLRS-L15", "DLRS-V5", "DLRS-V15", "DLRS (δ=0.02)"]

    def row(shift):
        seeds = list(rng.normal(1.0, 0.1, 10) + shift)
        return {"reward": float(np.mean(seeds)), "reward_seeds": seeds, "satisfaction": 0.5, "delay": 1.0,
                "llm_freq": 0.9, "c_freq": 0.0, "hit_rate": 0.1, "false_hit_rate": 0.01}

    results = {}
    for n in EDGES:
        for mode in MODES:
            base = row(0.0)
            for name in names:  # DLRS exactly 0.5 ahead of LRS on every stream
                r = dict(base)
                if name == "DLRS":
                    r["reward_seeds"] = [x + 0.5 for x in base["reward_seeds"]]
                    r["reward"] = base["reward"] + 0.5
                results[(n, mode, name)] = r
    torch.manual_seed(0)
    onnx_path = tmp_path / "d.onnx"
    export_onnx(DiffusionActor(384, F.K, 5, steps=5), onnx_path, dim=384, top_p=5, embedder_id="e",
                policy_version="t", calibration={"thresholds": {}})
    t = decision_ms(onnx_path, dim=384, top_p=5, calls=20)
    assert 0 < t["p50_ms"] <= t["p99_ms"]
    res = {"results": results, "calibrations": {}, "updates": 80, "seeds": 10, "eval_steps": 500, "t_train": 60.0,
           "t_total": 120.0, "cal_rows": [(0.02, 0.9, row(0.0))], "timing": {m: t for m in ("lrs", *DIFFUSION)},
           "parity": {m: 1e-7 for m in ("lrs", *DIFFUSION)}, "params": {m: 1000 for m in ("lrs", *DIFFUSION)}}
    # what PPO added over the imitation, read from the training logs the stage leaves in its run directory
    (tmp_path / "dlrs-w0.1.csv").write_text("update,env_steps,val_reward\n0,0,-8.0\n1,10,\n4,40,-7.9\n8,80,-7.95\n")
    (tmp_path / "dlrs-l5-w0.1.csv").write_text("update,env_steps,val_reward\n0,0,-8.0\n4,40,-8.1\n")
    res["imitation_ppo"] = imitation_and_ppo(tmp_path)
    assert res["imitation_ppo"]["dlrs"] == {"imitation": -8.0, "kept_update": 4, "kept": -7.9, "last_update": 8,
                                            "last": -7.95}
    assert res["imitation_ppo"]["dlrs-l5"]["kept_update"] == 0 and "lrs" not in res["imitation_ppo"]
    lines = section(res)
    text = "\n".join(lines)
    assert lines[0] == BEGIN and lines[-1] == END
    assert "| DLRS | -8.000 | -7.900 | 4 | -7.950 (update 8) |" in text and "reused from the full run" in text
    assert "+0.5000 ± 0.0000, 10/10 **>2SE**" in text and "in 8 of 8 configurations" in text
    doc = tmp_path / "policy-results.md"
    doc.write_text("# Policy results\n\nrows\n\n## Plots\n\n![x](x.png)\n")
    replace_section(doc, lines)
    first = doc.read_text()
    assert first.index(BEGIN) < first.index("## Plots") and first.startswith("# Policy results")
    replace_section(doc, lines)  # again: replaced, not appended
    assert doc.read_text() == first and first.count(BEGIN) == 1
    kept = existing_section(doc)
    doc.write_text("# Policy results, rewritten\n\n## Plots\n")  # what policy.report writes
    replace_section(doc, kept.split("\n"))
    assert existing_section(doc) == kept
