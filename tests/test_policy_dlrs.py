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
