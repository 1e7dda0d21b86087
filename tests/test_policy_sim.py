"""Simulator mechanics on a synthetic dataset (no embedder needed): determinism, Eq. 5, the xi rule,
modes."""

import numpy as np
import pytest

from policy.baselines import GreedyLLM, Oracle, RandomPolicy
from policy.data import synthetic_dataset
from policy.evaluate import calibrate, evaluate
from policy.sim import A, B, C, EdgeCache, SimConfig, SimEntry, make_sim
from velo_proxy import cache_value as cv
from velo_proxy import features as F


def _run(seed, steps=150, mode="nearest"):
    data = synthetic_dataset()
    sim = make_sim(data, seed=seed, mode=mode, episode_len=100)
    pol = RandomPolicy(seed)
    obs = sim.reset()
    trace = []
    for _ in range(steps):
        acts, _ = pol.act(sim, obs)
        r, info, done, obs = sim.step(acts)
        trace.append((r.copy(), info.action.copy(), [len(c) for c in sim.caches], F.stack_observations(obs)["hit_features"].sum()))
    return trace


def test_determinism_for_a_seed():
    a, b, c = _run(3), _run(3), _run(4)
    for x, y in zip(a, b):
        assert np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) and x[2] == y[2] and x[3] == y[3]
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))


def test_eq5_cache_value_update():
    v, n = cv.update_cache_value(0.0, 0, 1.0)
    assert (v, n) == (pytest.approx(cv.LEARNING_RATE), 1)
    v2, n2 = cv.update_cache_value(v, n, 0.0)
    assert (v2, n2) == (pytest.approx((1 - cv.LEARNING_RATE) * cv.LEARNING_RATE), 2)
    e = SimEntry(vector=np.ones(2, dtype=np.float32), answer=np.ones(2, dtype=np.float32), cluster=0, created_at=0.0)
    EdgeCache.record_use(e, 1.0)
    EdgeCache.record_use(e, 5.0)  # clipped to 1
    r = cv.LEARNING_RATE
    assert e.use_count == 2 and e.cache_value == pytest.approx(r + (1 - r) * r)


def test_below_mean_eviction_rule():
    mask = cv.below_mean_mask(np.array([0.1, 0.5, 0.9, 0.0]), np.array([10.0, 10.0, 10.0, 1.0]), grace_s=5.0)
    assert mask.tolist() == [True, False, False, False]  # mean 0.375; the young one is exempt
    cache = EdgeCache(dim=2, capacity=10)
    for i, (val, t) in enumerate([(0.1, 0.0), (0.5, 0.0), (0.9, 0.0), (0.0, 9.0)]):
        cache.add(SimEntry(vector=np.array([1.0, i], dtype=np.float32), answer=np.zeros(2, np.float32), cluster=i,
                           created_at=t, cache_value=val))
    assert cache.evict_below_mean(now=10.0, grace_s=5.0) == 1
    assert sorted(e.cluster for e in cache.entries) == [1, 2, 3]
    assert np.allclose(cache.mat[:3, 1], [e.vector[1] for e in cache.entries])  # matrix kept in step


def test_capacity_drops_lowest_value():
    cache = EdgeCache(dim=2, capacity=2)
    for i, val in enumerate([0.5, 0.1, 0.7]):
        cache.add(SimEntry(vector=np.array([1.0, i], np.float32), answer=np.zeros(2, np.float32), cluster=i,
                           created_at=0.0, cache_value=val))
    assert [e.cluster for e in cache.entries] == [0, 2]


def test_actions_outcomes_and_inserts():
    data = synthetic_dataset()
    sim = make_sim(data, n_agents=1, episode_len=1000)
    sim.reset()
    r, info, _, _ = sim.step([A])  # empty cache: A falls back to B and inserts
    assert info.action[0] == B and len(sim.caches[0]) == 1
    qos = sim.qos
    assert info.delay[0] == pytest.approx(qos.edge_s + qos.cloud_s + qos.link_s)
    assert r[0] == pytest.approx(qos.phi1 * (info.q[0] - qos.w * info.delay[0]))
    for _ in range(300):  # until a true duplicate is the top hit
        if sim.hits[0] and sim.hits[0][sim.sel[0]].entry.cluster == sim.requests[0]["cluster"]:
            break
        sim.step([B])
    rewards = sim.action_rewards()
    e = sim.hits[0][sim.sel[0]].entry
    uses = e.use_count
    _, info, _, _ = sim.step([A])
    assert info.hit[0] == 1 and info.false_hit[0] == 0 and info.delay[0] == pytest.approx(qos.edge_s + qos.link_s)
    assert e.use_count == uses + 1 and e.cache_value > 0
    assert rewards[0, A] > rewards[0, B]  # a right hit saves the cloud delay at equal quality


def test_all_edges_mode_takes_fastest_answer():
    data = synthetic_dataset()
    sim = make_sim(data, n_agents=3, mode="all", episode_len=1000)
    sim.reset()
    assert sim.N == 9 and len(sim.caches) == 3
    assert [sim.requests[k]["q"] for k in range(3)] == [sim.requests[0]["q"]] * 3  # region 0 -> edges 0, 1, 2
    acts = [B, C, B] * 3
    _, info, _, _ = sim.step(acts)
    # per request the home edge (k = 0, 4, 8) is fastest among equal actions; remote links are longer
    assert info.answered.tolist() == [1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert np.all(info.reward[:3] == info.reward[0])
    assert [len(c) for c in sim.caches] == [1, 1, 1]  # only the home edge stores
    assert sim.links.tolist() == pytest.approx([0.005, 0.035, 0.065, 0.035, 0.005, 0.035, 0.065, 0.035, 0.005])


def test_oracle_beats_random_and_llm():
    data = synthetic_dataset(n_clusters=90)
    cfg = SimConfig(split="train")
    o, r, g = (evaluate(data, p, cfg, 150) for p in (Oracle(), RandomPolicy(), GreedyLLM()))
    assert o["reward"] > r["reward"] and o["reward"] > g["reward"]
    assert g["llm_freq"] == 1.0 and g["hit_rate"] == 0.0


def test_calibration_thresholds():
    p = np.linspace(0, 1, 1001)
    rel = (p > 0.3).astype(float)
    cal = calibrate(p, rel, deltas=(0.01, 0.1))
    assert 0.29 < cal["0.01"] <= 0.4 and cal["0.1"] <= cal["0.01"]
    assert calibrate(np.array([0.9, 0.8]), np.array([0.0, 0.0]), deltas=(0.01,))["0.01"] > 1.0


def test_calibrate_rules_picks_most_serving_safe_tau():
    from policy.evaluate import calibrate_rules

    scores = {
        0.2: {"reward": -7.0, "hit_rate": 0.4, "false_hit_rate": 0.08, "hits": 2000},
        0.5: {"reward": -7.1, "hit_rate": 0.35, "false_hit_rate": 0.01, "hits": 2000},
        0.9: {"reward": -7.2, "hit_rate": 0.3, "false_hit_rate": 0.0, "hits": 2000},
        1.01: {"reward": -7.3, "hit_rate": 0.28, "false_hit_rate": 0.0, "hits": 1900},
    }
    taus, table = calibrate_rules(scores, deltas=(0.005, 0.02, 0.1))
    assert taus == {"0.005": 0.9, "0.02": 0.5, "0.1": 0.2}
    assert [r["tau"] for r in table] == [0.2, 0.5, 0.9, 1.01] and table[1]["false_hit_upper95"] > 0.01


def test_quantile_thresholds_round_down():
    from policy.evaluate import quantile_thresholds

    # a policy that serves everything (P(A) just under 1) must get a threshold it passes
    p_a = np.full(50, 0.99996, dtype=np.float32)
    taus = quantile_thresholds(p_a, (0.5, 0.9))
    assert taus == [0.9999] and all((p_a >= t).all() for t in taus)
    assert quantile_thresholds(np.linspace(0, 1, 11), (0.5,)) == [0.5]
    assert quantile_thresholds(np.zeros(0), (0.5,)) == []


def test_clusters_stream_is_shaped_like_the_benchmark():
    """The default stream: whole groups, every text once per episode, clusters interleaved."""
    data = synthetic_dataset(n_clusters=300)
    sim = make_sim(data, n_agents=2, episode_len=40)
    assert sim.cfg.stream == "clusters"
    sim.reset()
    per_region = [[], []]
    for _ in range(39):
        for r in range(2):
            per_region[r].append(sim.requests[r]["q"])
        sim.step([B, B])
    for texts in per_region:
        assert len(set(texts)) == len(texts)  # no text twice in an episode: the exact tier never answers
    clusters = [int(data.q_cluster[q]) for q in per_region[0]]
    # texts of one cluster arrive apart, not in a block (random order over the episode)
    firsts = {c: clusters.index(c) for c in set(clusters)}
    assert any(clusters.index(c, firsts[c] + 1) > firsts[c] + 1 for c in firsts if clusters.count(c) > 1)
    zipf = make_sim(data, n_agents=1, episode_len=200, stream="zipf")
    zipf.reset()
    seen = [zipf.requests[0]["q"]]
    for _ in range(150):
        zipf.step([B])
        seen.append(zipf.requests[0]["q"])
    assert len(set(seen)) < len(seen)  # the paper's stream repeats popular texts
    with pytest.raises(ValueError):
        make_sim(data, stream="bursty")


def test_verifier_scores_are_hit_features_of_the_verified_hits():
    """The hits the serving rule verifies (top_k above the cosine floor) carry the verifier's score and
    flag; the others carry neither, as in the proxy."""
    from policy.pair_scores import PairScores
    from velo_proxy.verifier import VerifyRule

    data = synthetic_dataset(n_clusters=120)
    calls = []

    def scorer(qa, qb):  # stands in for the cross-encoder: right about the cluster, by text
        calls.append(len(qa))
        return np.array([0.9 if data.q_cluster[int(a[1:])] == data.q_cluster[int(b[1:])] else 0.2
                         for a, b in zip(qa, qb)], dtype=np.float32)

    rule = VerifyRule(cosine_floor=0.3, top_k=2, threshold=0.5)
    data.pair_scores = PairScores(rule=rule, verifier_key="fake", _scorer=scorer)
    sim = make_sim(data, n_agents=2, episode_len=200)
    obs = sim.reset()
    k_score, k_flag = F.HIT_FEATURE_NAMES.index("verifier_score"), F.HIT_FEATURE_NAMES.index("verified")
    checked = 0
    for _ in range(120):
        for i, o in enumerate(obs):
            sims = [h.similarity for h in sim.hits[i]]
            expected = rule.candidates(sims)
            flags = o.hit_features[:, k_flag]
            assert np.flatnonzero(flags).tolist() == expected
            for j in expected:
                same = sim.hits[i][j].entry.cluster == sim.requests[i]["cluster"]
                assert o.hit_features[j, k_score] == pytest.approx(0.9 if same else 0.2)
                checked += 1
        _, _, _, obs = sim.step([B, B])
    assert checked > 20 and sum(calls) == len(data.pair_scores.table)  # each pair scored once
    assert len(calls) < 120  # batched: at most one call per step
    data.pair_scores = None
    bare = make_sim(data, n_agents=1).reset()
    assert not any(o.hit_features[:, k_flag].any() for o in bare)  # no verifier: nothing verified


def test_a_hit_cached_in_another_language_is_a_false_hit_for_a_and_relevant_for_c():
    """The reward of serving across languages (docs/policy.md, "C across languages"): A hands the user an
    answer in another language (moved by the measured translation distance, a false hit); C lets the LLM
    answer in the user's language with the cached Q&A, as relevant as within one language."""
    data = synthetic_dataset()
    c = next(k for k, m in enumerate(data.c_members) if len(m) >= 2)
    asked, cached = (int(x) for x in data.c_members[c][:2])
    data.q_text[asked] = "How many balls did Josh Norman intercept?"
    outcomes = {}
    for lang, text in (("same", "How many balls were intercepted by Josh Norman?"),
                       ("other", "¿Cuántos balones interceptó Josh Norman?")):
        data.q_text[cached] = text
        data.meta.pop("q_language", None)
        sim = make_sim(data, seed=0, n_agents=1)
        sim.place_request(0, asked, [cached], [0.0])
        column = F.HIT_FEATURE_NAMES.index("cross_language")
        assert sim.observations()[0].hit_features[0, column] == (1.0 if lang == "other" else 0.0)
        assert sim.servable(0, 0) == (lang == "same")
        expected = sim.expected_action_rewards()[0]
        exact = sim.action_rewards()[0]
        _, _, _, _, rel_a = sim._outcome(0, A)
        _, _, _, _, rel_c = sim._outcome(0, C)
        outcomes[lang] = (expected, exact, rel_a, rel_c)
    same, other = outcomes["same"], outcomes["other"]
    assert same[2] is True and other[2] is False  # A across languages is a false hit
    assert same[3] is True and other[3] is True  # C's cached Q&A is relevant either way
    assert other[0][A] < same[0][A] - 1.0 and other[1][A] < same[1][A] - 1.0  # phi1 x the translation distance
    assert other[0][C] == pytest.approx(same[0][C]) and other[0][B] == pytest.approx(same[0][B])
    assert other[0][C] > other[0][A]  # across languages the expert augments rather than serves
