"""Smoke training on a tiny real subset (a few hundred texts, real embedder) and ONNX export parity.

Needs the dataset slices in tests/data (DataSpec.tiny() reads them there) and the exported embedder
(`velo-proxy models export`); embeddings of the tiny subset are cached under ~/.cache/velo-proxy/sim after
the first run (~30 s on 2 cores)."""

import json
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from policy.baselines import NeuralPolicy, RandomPolicy  # noqa: E402
from policy.data import DataSpec  # noqa: E402
from policy.evaluate import evaluate  # noqa: E402
from policy.export import export_onnx, parity  # noqa: E402
from policy.sim import SimConfig  # noqa: E402
from policy.train import TrainConfig, train  # noqa: E402
from velo_proxy import features as F  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tiny_data):
    return tiny_data


@pytest.fixture(scope="module")
def trained(tiny):
    cfg = TrainConfig(method="lrs", updates=6, rollout_steps=64, eval_every=3, eval_steps=60, threads=1, demo_steps=400,
                      neighbour_demos=300, sim=SimConfig(episode_len=192, capacity=300))
    actor, hist = train(tiny, cfg, progress=False)
    return actor, hist


def test_tiny_dataset_has_splits_by_cluster(tiny):
    assert tiny.dim == 384 and tiny.q_emb.shape[0] >= 200
    for split in range(3):
        assert (tiny.c_split == split).any()
    # a text's cluster has one split; groups (near-miss partners) never straddle splits
    for g in np.unique(tiny.c_group):
        assert len(set(tiny.c_split[tiny.c_group == g].tolist())) == 1
    assert np.allclose(np.linalg.norm(tiny.q_emb, axis=1), 1.0, atol=1e-4)


def test_pairs_split_is_training_only_and_leaves_the_streams_alone(tiny, test_data):
    from policy.data import SOURCES, SPLITS, collect_texts
    from policy.sim import EdgeSim

    pairs = SPLITS.index("pairs")
    by_split = {s: {tiny.q_text[q] for c in np.flatnonzero(tiny.c_split == i) for q in tiny.c_members[c]}
                for i, s in enumerate(SPLITS)}
    assert by_split["pairs"] and not by_split["pairs"] & (by_split["train"] | by_split["val"] | by_split["test"])
    srcs = {SOURCES[s] for s in tiny.c_source[tiny.c_split == pairs]}
    assert srcs == {"qqp", "sts"}
    # STS-B sentences come in the five XQuAD languages: clusters of translations
    sts = np.flatnonzero((tiny.c_split == pairs) & (tiny.c_source == SOURCES.index("sts")))
    assert max(len(tiny.c_members[c]) for c in sts) >= 5
    # with or without the pairs, the stream splits are the same clusters
    spec = DataSpec.tiny()
    with_pairs = [c for c in collect_texts(spec)["clusters"] if c["split"] != pairs]
    without = collect_texts(replace(spec, qqp_pair_rows=0, sts_rows=0))["clusters"]
    assert with_pairs == without
    # and no stream draws from them
    sim = EdgeSim(tiny, SimConfig(split="train", capacity=300))
    drawn = {int(c) for _, groups, _ in sim._src for g in groups for c in g}
    assert drawn and all(tiny.c_split[c] == SPLITS.index("train") for c in drawn)


def test_smoke_training_beats_random(tiny, trained):
    actor, hist = trained
    # update 0 = the imitation alone, validated before any PPO update (it may be the actor kept)
    assert hist[0]["update"] == 0 and isinstance(hist[0]["val_reward"], float)
    assert len(hist) == 7 and hist[-1]["env_steps"] == 6 * 64 * 3
    cfg = SimConfig(split="train", capacity=300)
    lrs = evaluate(tiny, NeuralPolicy(actor, "lrs"), cfg, 200, seed=5)
    rnd = evaluate(tiny, RandomPolicy(0), cfg, 200, seed=5)
    assert lrs["reward"] > rnd["reward"], (lrs, rnd)


def test_neighbour_demos_are_labelled_training_decisions(tiny):
    from policy.train import collect_neighbour_demos

    sim_cfg = SimConfig(capacity=300)
    demos = collect_neighbour_demos(tiny, sim_cfg, 240, seed=3)
    u, v, feats, mask, regret, label = demos
    assert u.shape[0] == 240 and mask[:, 0].eq(1).all()  # every decision has a hit: a semantic decision
    train_c = np.concatenate([tiny.clusters("train"), tiny.clusters("pairs")])
    train_q = {tuple(np.round(tiny.q_emb[q], 5)) for c in train_c for q in tiny.c_members[c]}
    for i in range(0, 240, 17):  # request and hits come from the training data only, never the request itself
        assert tuple(np.round(u[i].numpy(), 5)) in train_q
        for j in range(int(mask[i].sum())):
            assert tuple(np.round(v[i, j].numpy(), 5)) in train_q
            assert not torch.allclose(v[i, j], u[i])
    # the expert's label has zero regret, the others do not cost less; labels are not all one action
    assert torch.all(regret.gather(1, label[:, None]) == 0)
    assert len(set(label.tolist())) >= 2
    # entries are unused: use count 0 and the initial cache value
    k_use, k_val = F.HIT_FEATURE_NAMES.index("log_use_count"), F.HIT_FEATURE_NAMES.index("cache_value")
    assert feats[..., k_use].eq(0).all() and feats[..., k_val].eq(0).all()
    # the expert serves (A) true duplicates, which are more similar on average than what it forwards (B)
    sims = feats[:, 0, F.HIT_FEATURE_NAMES.index("similarity")]
    assert sims[label == 0].mean() > sims[label == 1].mean()
    # the verifier's scores are features of the verified hits, and it scores served duplicates higher
    flag, score = feats[..., F.HIT_FEATURE_NAMES.index("verified")], feats[..., F.HIT_FEATURE_NAMES.index("verifier_score")]
    rule = tiny.pair_scores.rule
    assert flag.sum() > 0 and torch.all(flag.sum(1) <= rule.top_k) and torch.all(score[flag == 0] == 0)
    assert torch.all(feats[..., 0][flag == 1] >= rule.cosine_floor - 1e-6)
    served, forwarded = score[label == 0][:, 0], score[label == 1][:, 0]
    assert served.mean() > forwarded.mean()


def test_training_is_reproducible(tiny):
    cfg = TrainConfig(method="mappo", updates=2, rollout_steps=32, eval_every=100, eval_steps=20,
                      sim=SimConfig(episode_len=64, capacity=100))
    a1, h1 = train(tiny, cfg, progress=False)
    a2, h2 = train(tiny, cfg, progress=False)
    assert [r["rollout_reward"] for r in h1] == [r["rollout_reward"] for r in h2]
    for p, q in zip(a1.parameters(), a2.parameters()):
        assert torch.equal(p, q)


def test_advantage_choice_changes_the_update(tiny):
    cfg = TrainConfig(method="mappo", updates=1, rollout_steps=32, eval_every=100, eval_steps=20,
                      sim=SimConfig(episode_len=64, capacity=100))
    base, _ = train(tiny, cfg, progress=False)
    for advantage in ("gae-expected", "immediate"):
        other, _ = train(tiny, replace(cfg, advantage=advantage), progress=False)
        assert any(not torch.equal(p, q) for p, q in zip(base.parameters(), other.parameters())), advantage
    with pytest.raises(ValueError, match="unknown advantage"):
        train(tiny, replace(cfg, advantage="td"), progress=False)


def test_export_parity_and_metadata(tiny, trained, tmp_path):
    import onnxruntime as ort

    actor, _ = trained
    cal = {"default_delta": 0.02, "rule": "serve_a_if_p_a_at_least", "thresholds": {"0.02": 0.9}}
    path = tmp_path / "actor.onnx"
    export_onnx(actor, path, dim=tiny.dim, top_p=5, embedder_id=tiny.embedder_id, policy_version="test",
                calibration=cal)
    assert parity(actor, path, dim=tiny.dim, top_p=5) <= 1e-5
    m = onnx.load(str(path))
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["velo_feature_version"] == str(F.FEATURE_VERSION) and meta["velo_dim"] == "384"
    assert meta["velo_top_p"] == "5" and meta["velo_k"] == str(F.K) and meta["velo_embedder_id"] == tiny.embedder_id
    assert json.loads(meta["velo_calibration"]) == cal and meta["velo_policy_version"] == "test"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == list(F.INPUT_NAMES)
    assert sess.get_outputs()[0].name == "action_probs"
    # dynamic batch: 1 and 7 rows, real observations built by features.py
    from policy.sim import EdgeSim

    sim = EdgeSim(tiny, replace(SimConfig(), n_agents=7))
    for _ in range(30):
        obs = sim.observations()
        sim.step([1] * 7)
    for b in (1, 7):
        batch = F.stack_observations(obs[:b])
        out = sess.run(["action_probs"], batch)[0]
        assert out.shape == (b, 3) and np.allclose(out.sum(1), 1.0, atol=1e-5)
        with torch.no_grad():
            ref = torch.softmax(actor(*(torch.from_numpy(batch[k]) for k in F.INPUT_NAMES)), -1).numpy()
        assert np.max(np.abs(out - ref)) <= 1e-5


def test_collect_calibration_records_under_a_driver(tiny, trained):
    from policy.baselines import StaticThreshold
    from policy.evaluate import collect_calibration

    actor, _ = trained
    cfg = SimConfig(split="val", capacity=300)
    rec = collect_calibration(tiny, NeuralPolicy(actor, "lrs"), cfg, 150, seed=9, driver=StaticThreshold(0.9))
    # the run is the driver's: same metrics as evaluating the threshold alone on that seed
    assert rec["metrics"] == evaluate(tiny, StaticThreshold(0.9), cfg, 150, seed=9)
    n = len(rec["p_a"])
    assert n > 0 and all(len(rec[k]) == n for k in ("similarity", "relevant", "source", "verifier"))
    assert ((rec["p_a"] >= 0) & (rec["p_a"] <= 1)).all() and (rec["similarity"] <= 1.0 + 1e-5).all()
    # the Eq. 4 entry's verifier score where the rule verified it (cosine above the floor), NaN elsewhere
    verified = np.isfinite(rec["verifier"])
    assert verified.any() and (rec["similarity"][verified] >= tiny.pair_scores.rule.cosine_floor - 1e-6).all()


def test_languages_diagnosis_counts_cross_language_decisions(tiny, trained):
    """policy.diagnose --languages: the decisions whose Eq. 4 entry is cached in another language, with the
    actor's, the oracle's and the expert's actions; serving such an entry as is (A) is never the oracle's
    choice, since the answer would reach the user in another language."""
    from policy.diagnose import languages
    from policy.sim import A

    actor, _ = trained
    out = languages(tiny, "lrs", actor, SimConfig(split="test", capacity=300), steps=80, seeds=(1, 2))
    assert set(out["rules"]) == {"reward τ", "δ = 2 %", "δ = 10 %"}
    seen = 0
    for label, by_kind in out["decisions"].items():
        for kind, (actor_row, oracle_row, expert_row) in by_kind.items():
            assert kind in ("same question", "another question")
            assert sum(actor_row) == sum(oracle_row) == sum(expert_row) > 0
            assert oracle_row[A] == 0 and expert_row[A] == 0
            seen += sum(actor_row)
    assert seen > 0  # XQuAD's translations do meet in the tiny streams


def test_translation_distance_is_measured_on_xquad(tiny, embedder_dir):
    """python -m policy.data --translation-distance, the simulator's QoSConfig.translation_distance: an answer
    in another language is nearer its English original than an unrelated answer is, and nearer in Latin
    script (names and numbers are shared) than in Cyrillic or Han."""
    from policy.data import translation_distance
    from velo_proxy.embedder import OnnxEmbedder

    d = translation_distance(OnnxEmbedder(embedder_dir, threads=2))
    assert set(d) == {"es", "de", "ru", "zh", "all", "unrelated"}
    assert 0.3 < d["all"] < d["unrelated"] < 1.5
    assert max(d["es"], d["de"]) < min(d["ru"], d["zh"])


def test_roc_auc_by_hand():
    from policy.diagnose import roc_auc_score

    # positives 0.9, 0.4; negatives 0.5, 0.4, 0.1: pairs won 3 + 1 + 0.5 (tie) of 6
    assert roc_auc_score(np.array([1, 0, 1, 0, 0]), np.array([0.9, 0.5, 0.4, 0.4, 0.1])) == 4.5 / 6


def test_paired_difference_by_hand():
    from policy.evaluate import paired_difference

    a = {"reward_seeds": [-7.0, -6.0, -8.0]}
    b = {"reward_seeds": [-7.1, -5.9, -8.2]}
    d = paired_difference(a, b)  # differences 0.1, -0.1, 0.2: mean 0.0667, sd 0.1528
    assert d["ahead"] == 2 and d["seeds"] == 3
    assert d["mean"] == pytest.approx(0.2 / 3)
    assert d["se"] == pytest.approx(np.std([0.1, -0.1, 0.2], ddof=1) / np.sqrt(3))
