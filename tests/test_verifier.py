"""The pair verifier: the rules that make near misses, the serving rule and its calibration, the export
(torch vs onnxruntime parity, fp32 and int8) and a tiny end-to-end training run on tests/data."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from policy import near_miss as N
from policy import verifier_calibrate as C
from velo_proxy.verifier import PairVerifier, VerifyRule, threshold_for

REPO = Path(__file__).resolve().parents[1]


# ----- rule-made near misses ------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("How do I convert a string to an int in Python?", "How do I convert an int to a string in Python?"),
    ("What is the cheapest flight from London to New York?", "What is the cheapest flight from New York to London?"),
    ("How do I transfer money from PayPal to my bank account?", "How do I transfer money from my bank account to PayPal?"),
])
def test_direction_swap_moves_whole_phrases(text, expected):
    assert N.swap_direction(text, random.Random(0)) == expected


def test_direction_swap_needs_two_different_ends():
    assert N.swap_direction("Why is the sky blue?", random.Random(0)) is None
    assert N.swap_direction("How to go from A to A?", random.Random(0)) is None


def test_negation_antonym_number_entity():
    rng = random.Random(0)
    assert N.negate("Can I take ibuprofen with alcohol?", rng) == "Can I take ibuprofen without alcohol?"
    assert N.antonym("What is the best phone?", rng) == "What is the worst phone?"
    # a capitalised word inside the sentence is a name, not an adjective
    assert N.antonym("Flights to New York", rng) is None
    changed = N.change_number("Who won the World Cup in 2014?", rng)
    assert changed != "Who won the World Cup in 2014?" and "201" in changed
    entity = N.change_entity("How do I get a visa for Canada?", rng)
    assert entity is not None and "Canada" not in entity


def test_surface_rewrite_keeps_symmetric_pairs_and_phrasing():
    rng = random.Random(1)
    out = {N.surface_rewrite("What is the difference between Java and Python?", rng) for _ in range(20)}
    assert "What is the difference between Python and Java?" in out
    assert all(o and o != "What is the difference between Java and Python?" for o in out)


def test_near_misses_are_all_different_from_the_text():
    rng = random.Random(0)
    for text in ("Which is the best phone under 20000 in India?", "Best way to move from India to Canada?"):
        edits = N.near_misses(text, rng)
        assert len(edits) >= 2
        assert all(e.lower() != text.lower() for _, e in edits)


# ----- the serving rule and its calibration ------------------------------------------------------------


def test_verify_rule_takes_top_k_above_the_floor_and_serves_the_best_score():
    rule = VerifyRule(cosine_floor=0.8, top_k=2, threshold=0.9)
    assert rule.candidates([0.95, 0.85, 0.82, 0.5]) == [0, 1]
    assert rule.candidates([0.79, 0.5]) == []
    assert rule.choose([0, 1], [0.4, 0.95]) == 1
    assert rule.choose([0, 1], [0.4, 0.89]) is None
    assert rule.choose([], []) is None


def test_verified_policy_verifies_only_what_it_could_serve():
    """Without a threshold calibrated for the bound nothing can be served, so no hit costs a verifier call;
    the learned policy still verifies its candidates, because their scores are its features."""
    from types import SimpleNamespace

    from velo_proxy.policy import VerifiedPolicy

    hits = [SimpleNamespace(similarity=s) for s in (0.97, 0.9, 0.7)]
    assert VerifiedPolicy(rule=VerifyRule(0.75, 3, 0.9), version="v").to_verify(hits) == [0, 1]
    assert VerifiedPolicy(rule=VerifyRule(0.75, 3, float("inf")), version="v").to_verify(hits) == []
    assert VerifiedPolicy(rule=None, version="v").to_verify(hits) == []


def test_threshold_for_takes_the_strictest_calibrated_bound_not_above_delta():
    cal = {"thresholds": {"0.01": 0.99, "0.02": 0.97, "0.05": 0.9}}
    assert threshold_for(cal, 0.02) == 0.97
    assert threshold_for(cal, 0.03) == 0.97  # between two deltas: the stricter one
    assert threshold_for(cal, 0.2) == 0.9
    assert threshold_for(cal, 0.005) == float("inf")  # stricter than anything calibrated: never serve


def test_clopper_pearson_upper_bound():
    from scipy.stats import binom

    assert C.upper_bound(0, 300) == pytest.approx(1 - 0.05 ** (1 / 300), rel=1e-6)  # ~ 3 / n
    for false, hits in ((3, 200), (10, 1000), (1, 50)):
        ub = C.upper_bound(false, hits)
        assert false / hits < ub < 1
        assert binom.cdf(false, hits, ub) == pytest.approx(0.05, abs=1e-6)  # the defining property
    assert C.upper_bound(0, 0) == 1.0 and C.upper_bound(5, 5) == 1.0


def _toy_workload() -> C.Prepared:
    # requests 0..5; clusters: 0,1 same; 2 alone; 3 near miss of 0 (cluster 2); 4 same as 2; 5 same as 0
    cluster = np.array([0, 0, 1, 2, 1, 0])
    nbr = [[], [0], [0], [0, 1], [2, 3], [1, 0, 3]]
    sim = [[], [0.95], [0.8], [0.97, 0.96], [0.9, 0.85], [0.96, 0.95, 0.9]]
    score = [[], [0.99], [0.1], [0.6, 0.55], [0.97, 0.2], [0.98, 0.99, 0.3]]
    return C.Prepared("toy", cluster, nbr, sim, score)


def test_replay_serves_verified_hits_and_forwards_the_rest():
    w = _toy_workload()
    r = C.replay(w, VerifyRule(cosine_floor=0.75, top_k=3, threshold=0.9))
    # 1 served from 0; 2 forwarded (0.1); 3 forwarded (near miss scored 0.6); 4 served from 2;
    # 5: candidates are the cached ones (0 and 3; 1 was served, never cached) -> 0 (0.99)
    assert r["served"].tolist() == [-1, 0, -1, -1, 2, 0]
    assert (r["hits"], r["correct"], r["false"], r["positives"]) == (3, 3, 0, 3)
    loose = C.replay(w, VerifyRule(cosine_floor=0.75, top_k=3, threshold=0.5))
    assert loose["served"][3] == 0 and loose["false"] == 1  # the near miss is served when the bar is low
    assert loose["unlabelled"] == 1 and loose["false_estimated"] == 1.0  # no label: counted wrong (weight 1)
    labelled = C.Prepared("toy", w.cluster, w.nbr, w.sim, w.score, neg_edges={(0, 2)}, unlabelled_weight=0.2)
    r = C.replay(labelled, VerifyRule(cosine_floor=0.75, top_k=3, threshold=0.5))
    assert (r["labelled_wrong"], r["unlabelled"], r["false_estimated"]) == (1, 0, 1.0)
    unl = C.Prepared("toy", w.cluster, w.nbr, w.sim, w.score, unlabelled_weight=0.2)
    assert C.replay(unl, VerifyRule(cosine_floor=0.75, top_k=3, threshold=0.5))["false_estimated"] == 0.2


def test_the_label_audit_is_read_with_its_upper_bounds():
    unl = C.unlabelled_wrong_share(population="unlabelled")
    lab = C.unlabelled_wrong_share(population="labelled_negative")
    assert unl["audited"] >= 80 and lab["audited"] >= 50
    assert 0 < unl["share"] < unl["upper"] < 1 and 0 < lab["share"] < lab["upper"] < 1
    assert C.qqp_label_weights() == (lab["upper"], unl["upper"])


def test_an_audit_of_a_verifiers_own_hits_weighs_them_by_score_band(tmp_path):
    """A hit the verifier served with a score inside an audited band counts as that band's wrong share (its
    upper bound); below every band, or for another verifier, the first audit's weight stands."""
    import json

    audit = tmp_path / "audit.jsonl"
    rows = [{"population": "unlabelled", "q1": f"a{i}", "q2": f"b{i}", "same": int(i >= 2)} for i in range(10)]
    rows += [{"population": "unlabelled", "q1": f"c{i}", "q2": f"d{i}", "same": int(i >= 1), "verifier": "v1",
              "band": 0.9, "score": 0.95} for i in range(40)]
    rows += [{"population": "labelled_negative", "q1": f"e{i}", "q2": f"f{i}", "same": int(i >= 10), "verifier": "v1",
              "band": 0.9, "score": 0.95} for i in range(40)]
    audit.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = C.audit_share(population="unlabelled", path=audit)
    band_u = C.audit_share(population="unlabelled", verifier="v1", band=0.9, path=audit)
    assert (first["audited"], first["wrong"], band_u["audited"], band_u["wrong"]) == (10, 2, 40, 1)
    assert band_u["upper"] == pytest.approx(C.upper_bound(1, 40)) and band_u["upper"] < first["upper"]
    bands = C.score_bands("v1", path=audit)
    assert bands == {"unlabelled": [(0.9, band_u["upper"])],
                     "labelled_negative": [(0.9, C.upper_bound(10, 40))]}
    assert C.score_bands("another", path=audit) == {"unlabelled": [], "labelled_negative": []}
    assert C.band_weight(bands["unlabelled"], 0.95, default=0.5) == band_u["upper"]
    assert C.band_weight(bands["unlabelled"], 0.85, default=0.5) == 0.5  # below the band: the first audit's
    # in the replay: the near miss of the toy stream (score 0.6) is outside a 0.9 band, inside a 0.5 one
    w = _toy_workload()
    rule = VerifyRule(cosine_floor=0.75, top_k=3, threshold=0.5)
    for lo, expected in ((0.9, 0.2), (0.5, 0.05)):
        banded = C.Prepared("toy", w.cluster, w.nbr, w.sim, w.score, unlabelled_weight=0.2,
                            unlabelled_bands=[(lo, 0.05)])
        assert C.replay(banded, rule)["false_estimated"] == pytest.approx(expected)


def test_a_blind_judgement_is_merged_into_the_audit_with_its_verifier_and_band(tmp_path):
    """policy.label_audit: the judge's file names only ids; merge joins them with what each id is (a pair
    judged before keeps its judgement), refuses an incomplete judgement, and the band's weights follow."""
    import json

    from policy import label_audit

    out = tmp_path / "audit"
    out.mkdir()
    rows = {"a0000": {"population": "unlabelled", "q1": "How do I learn Go?", "q2": "How can I learn Go?",
                      "cosine": 0.95, "score": 0.97},
            "a0001": {"population": "labelled_negative", "q1": "Flights from Paris to Rome?",
                      "q2": "Flights from Rome to Paris?", "cosine": 0.99, "score": 0.93},
            "a0002": {"population": "unlabelled", "q1": "What is Go?", "q2": "What is Rust?", "cosine": 0.9,
                      "score": 0.91, "same": 0}}  # judged before
    (out / "key.json").write_text(json.dumps({"verifier": "v9", "min_score": 0.9, "rows": rows}))
    audit = tmp_path / "audit.jsonl"
    audit.write_text("")
    (out / "labels.tsv").write_text("a0000\t1\n")
    assert label_audit.main(["merge", "--out", str(out), "--audit-file", str(audit)]) == 2  # a0001 not judged
    assert audit.read_text() == ""
    (out / "labels.tsv").write_text("a0000\t1\na0001\t0\n")
    assert label_audit.main(["merge", "--out", str(out), "--audit-file", str(audit)]) == 0
    merged = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(r["q1"], r["same"], r["verifier"], r["band"]) for r in merged] == [
        ("How do I learn Go?", 1, "v9", 0.9), ("Flights from Paris to Rome?", 0, "v9", 0.9), ("What is Go?", 0, "v9", 0.9)]
    assert C.audit_share(population="unlabelled", verifier="v9", band=0.9, path=audit)["wrong"] == 1
    assert C.judged_pairs(audit)[tuple(sorted(("Flights from Paris to Rome?", "Flights from Rome to Paris?")))] == 0


def test_choose_thresholds_respects_the_pooled_bound_and_every_workload():
    def row(t, hits, false, per):
        return {"threshold": t, "hits": hits, "false": false, "correct": hits - false, "fhr": false / hits,
                "ucb": C.upper_bound(false, hits), "workloads": per}

    rows = [row(0.5, 1000, 60, {"a": {"fhr_estimated": 0.06}}),
            row(0.9, 800, 8, {"a": {"fhr_estimated": 0.01}, "b": {"fhr_estimated": 0.03}}),
            row(0.95, 600, 3, {"a": {"fhr_estimated": 0.005}, "b": {"fhr_estimated": 0.005}})]
    chosen = C.choose_thresholds(rows, deltas=(0.01, 0.02, 0.1))
    assert chosen["0.1"]["threshold"] == 0.5
    assert chosen["0.02"]["threshold"] == 0.95  # 0.9 has a workload at 3 %
    assert chosen["0.01"] is None  # 3 of 600 is 0.5 %, but its 95 % upper bound is 1.3 %: not proven


# ----- the exported model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported_fp32(tmp_path_factory):
    from velo_proxy.verifier_export import export_verifier

    return export_verifier(tmp_path_factory.mktemp("verifier") / "fp32", precision="fp32")


def test_export_matches_torch_and_int8_keeps_the_ranking(exported_fp32, english_verifier_dir):
    from velo_proxy.model_export import EMBEDDER_ID
    from velo_proxy.verifier_export import (CARD_FILE, WEIGHTS_FILE, build_torch_module, calibration_blocks, check_parity,
                                            shipped_dir)

    module = build_torch_module(shipped_dir() / WEIGHTS_FILE)
    assert check_parity(exported_fp32, module) <= 1e-4
    meta = json.loads((exported_fp32 / "velo_verifier.json").read_text())
    card = json.loads((shipped_dir() / CARD_FILE).read_text())
    assert meta["precision"] == "fp32" and meta["embedder_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    fp32 = PairVerifier(exported_fp32)
    shipped = PairVerifier(english_verifier_dir)  # exported by `velo-proxy models export`
    assert shipped.metadata["precision"] == card["precision"]
    blocks = calibration_blocks(card, card["precision"], default_embedder=EMBEDDER_ID)
    assert shipped.calibration["thresholds"] == blocks[EMBEDDER_ID]["thresholds"]
    assert shipped.metadata["calibrations"] == blocks  # one block per embedder it can serve with
    pairs = [(json.loads(line)["cached"], json.loads(line)["asked"], json.loads(line)["same"])
             for line in (REPO / "tests" / "data" / "near_misses.jsonl").read_text().splitlines()]
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    s32, s_shipped = fp32.score_pairs(a, b), shipped.score_pairs(a, b)
    # int8 moves scores a little (one near-miss pair by up to ~0.3), not their order: the card's held-out AUC is
    # what decides the precision
    assert np.median(np.abs(s32 - s_shipped)) < 0.05 and np.abs(s32 - s_shipped).max() < 0.4
    assert np.corrcoef(s32, s_shipped)[0, 1] > 0.95
    # batched and one at a time agree (padding does not leak into the score)
    assert abs(float(fp32.score_pairs(a[:1], b[:1])[0]) - float(s32[0])) < 1e-5
    # a card recalibrated without new weights is exported again (an installed verifier never keeps stale thresholds)
    from velo_proxy.verifier_export import is_complete

    assert is_complete(exported_fp32, meta["source_sha256"], "fp32", meta["calibrations"])
    changed = {k: {**v, "thresholds": {"0.1": 0.5}} for k, v in meta["calibrations"].items()}
    assert not is_complete(exported_fp32, meta["source_sha256"], "fp32", changed)


def test_verifier_refuses_a_missing_directory(tmp_path):
    from velo_proxy.verifier import VerifierUnavailable

    with pytest.raises(VerifierUnavailable, match="velo-proxy models export"):
        PairVerifier(tmp_path / "nothing")


# ----- the request path: concurrent verifications are micro-batched -----------------------------------------

TIGHT = 1e-5


def _near_miss_rows() -> list[dict]:
    return [json.loads(line) for line in (REPO / "tests" / "data" / "near_misses.jsonl").read_text().splitlines()]


def _callers(n: int) -> list[tuple[str, list[str]]]:
    """n (question, candidates) requests, 1 to 3 candidates each (the serving rule's top_k), of mixed lengths."""
    rows = _near_miss_rows()
    texts = [r["cached"] for r in rows] + [r["asked"] for r in rows]
    return [(rows[i % len(rows)]["asked"], [texts[(7 * i + j) % len(texts)] for j in range(1 + i % 3)])
            for i in range(n)]


def _unbatched(verifier: PairVerifier, callers: list[tuple[str, list[str]]]) -> list[np.ndarray]:
    """Each pair scored alone: no padding, no company."""
    return [np.array([verifier.score_pairs([q], [c])[0] for c in cands], dtype=np.float32) for q, cands in callers]


def _gate(verifier: PairVerifier):
    """Hold the worker thread inside its next onnxruntime call until ``gate`` is set; ``entered`` says it got there."""
    import threading

    gate, entered, inner = threading.Event(), threading.Event(), verifier.batcher.infer

    def gated(items):
        entered.set()
        gate.wait(60)
        return inner(items)

    verifier.batcher.infer = gated
    return gate, entered


@pytest.fixture
def serving_verifier(verifier_dir):
    verifier = PairVerifier(verifier_dir, batch_max=24)
    try:
        yield verifier
    finally:
        verifier.close()


async def test_concurrent_scores_are_batched_and_match_unbatched(serving_verifier):
    verifier = serving_verifier
    callers = _callers(40)
    expected = _unbatched(verifier, callers)
    sizes: list[int] = []
    inner = verifier.batcher.infer
    verifier.batcher.infer = lambda items: sizes.append(len(items)) or inner(items)
    calls, pairs = verifier.calls, verifier.pairs_scored

    got = await asyncio.gather(*(verifier.score(q, cands) for q, cands in callers))

    total = sum(len(c) for _, c in callers)
    assert verifier.pairs_scored - pairs == total and sum(sizes) == total
    assert verifier.calls - calls == len(sizes) == verifier.batcher.batches_run
    assert len(sizes) < len(callers) and max(sizes) <= 24  # 40 callers, 80 pairs: a handful of batches
    for (q, cands), want, have in zip(callers, expected, got):  # each caller its own scores, in its order
        assert have.dtype == np.float32 and have.shape == (len(cands),)
        assert float(np.abs(have - want).max()) <= TIGHT  # padding within a batch does not move a score
    # the blocking paths give the same numbers
    q, cands = callers[5]
    assert float(np.abs(verifier.score_sync(q, cands) - expected[5]).max()) <= TIGHT
    assert (await verifier.score(q, [])).shape == (0,)


async def test_a_request_larger_than_a_batch_runs_alone(verifier_dir):
    verifier = PairVerifier(verifier_dir, batch_max=2)
    try:
        callers = _callers(6)
        callers[2] = (callers[2][0], [c for _, cands in callers for c in cands][:5])
        expected = _unbatched(verifier, callers)
        got = await asyncio.gather(*(verifier.score(q, cands) for q, cands in callers))
        for want, have in zip(expected, got):
            assert float(np.abs(have - want).max()) <= TIGHT
    finally:
        verifier.close()


async def test_callers_that_gave_up_are_skipped(serving_verifier):
    verifier = serving_verifier
    callers = _callers(6)
    expected = _unbatched(verifier, callers)
    gate, entered = _gate(verifier)
    busy = asyncio.create_task(verifier.score(*callers[0]))
    await asyncio.to_thread(entered.wait, 60)  # the worker is inside the first batch; the rest queue
    tasks = [asyncio.create_task(verifier.score(q, cands)) for q, cands in callers[1:]]
    await asyncio.sleep(0)  # let them enqueue
    tasks[1].cancel()
    timed_out = asyncio.create_task(asyncio.wait_for(verifier.score(*callers[3]), timeout=0.001))
    with pytest.raises(asyncio.TimeoutError):
        await timed_out  # the worker is held: it cannot have answered
    skipped = verifier.batcher.cancelled_skipped
    gate.set()
    done = await asyncio.gather(busy, *tasks, return_exceptions=True)
    assert isinstance(done[2], asyncio.CancelledError)
    for i in (0, 1, 3, 4, 5):
        assert float(np.abs(done[i] - expected[i]).max()) <= TIGHT
    assert verifier.batcher.cancelled_skipped - skipped == 2  # the cancelled and the timed-out caller
    assert verifier.batcher.running


async def test_a_failing_batch_fails_its_callers_and_the_verifier_keeps_serving(serving_verifier):
    from velo_proxy.verifier import VerifierError

    verifier = serving_verifier
    callers = _callers(4)
    inner = verifier.batcher.infer
    failures = [RuntimeError("onnxruntime broke")]

    def flaky(items):
        if failures:
            raise failures.pop()
        return inner(items)

    verifier.batcher.infer = flaky
    done = await asyncio.gather(*(verifier.score(q, cands) for q, cands in callers), return_exceptions=True)
    assert all(isinstance(d, VerifierError) and "onnxruntime broke" in str(d) for d in done)  # one batch, all failed
    got = await verifier.score(*callers[1])
    assert float(np.abs(got - _unbatched(verifier, callers[1:2])[0]).max()) <= TIGHT


async def test_close_fails_waiting_callers_and_later_scores(verifier_dir):
    from velo_proxy.metrics import Metrics
    from velo_proxy.pipeline.guard import Breaker, Guard
    from velo_proxy.verifier import VerifierError

    verifier = PairVerifier(verifier_dir)
    callers = _callers(3)
    gate, entered = _gate(verifier)
    in_flight = asyncio.create_task(verifier.score(*callers[0]))
    await asyncio.to_thread(entered.wait, 60)
    queued = asyncio.create_task(verifier.score(*callers[1]))
    await asyncio.sleep(0)
    verifier.close()  # Services.aclose calls it on the event loop
    try:
        for task in (in_flight, queued):
            with pytest.raises(VerifierError, match="closed"):
                await task
        with pytest.raises(VerifierError, match="closed"):
            await verifier.score(*callers[2])
        assert not verifier.batcher.running
        # the request path's guard takes it for a failure: no scores, no semantic hit
        metrics = Metrics()
        guard = Guard(breaker=Breaker(), metrics=metrics)
        assert await guard.call("verifier", lambda: verifier.score(*callers[2]), deadline_s=5) is None
        assert metrics.registry.get_sample_value("velo_component_failures_total",
                                                 {"component": "verifier", "reason": "VerifierError"}) == 1
    finally:
        gate.set()
    verifier.close()  # idempotent
    assert verifier.score_sync(*callers[2]).shape == (len(callers[2][1]),)  # offline scoring is untouched


def test_the_batcher_follows_the_event_loop(verifier_dir):
    """Used on one event loop, then on another (the old one closed): it moves; close() outside any loop works."""
    verifier = PairVerifier(verifier_dir)
    q, cands = _callers(3)[2]
    first = asyncio.run(verifier.score(q, cands))
    second = asyncio.run(verifier.score(q, cands))
    assert float(np.abs(first - second).max()) <= TIGHT and verifier.batcher.batches_run == 2
    verifier.close()
    assert not verifier.batcher.running


def test_settings_reach_the_verifier(verifier_dir):
    from velo_proxy.settings import Settings

    fields = Settings.model_fields
    assert (fields["verifier_batch_max"].default, fields["verifier_batch_wait_ms"].default) == (3, 0.0)
    assert Settings(verifier_batch_max=7, verifier_batch_wait_ms=3).verifier_batch_max == 7
    verifier = PairVerifier(verifier_dir, batch_max=7, batch_wait_ms=3)
    assert (verifier.batcher.max_items, verifier.batcher.wait_s) == (7, 0.003)
    verifier.close()


# ----- training end to end, tiny ---------------------------------------------------------------------------


def test_tiny_training_run_writes_weights_card_and_calibration(tmp_path, test_data):
    env = {**os.environ, "VELO_DATASETS_DIR": str(test_data), "VELO_SIM_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "policy.verifier_train", "--tiny", "--out", str(out), "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((out / "pair-verifier.json").read_text())
    assert (out / "pair-verifier.safetensors").stat().st_size > 1_000_000
    assert set(card["metrics"]) == {"fp32", "int8"} and card["precision"] in ("fp32", "int8")
    assert card["curve"] and card["curve"][-1]["step"] >= 1
    # both precisions, each with both MiniLM builds (the int8 one at its matched floor)
    assert set(card["calibration"]) == {"fp32", "int8"}
    blocks = card["calibration"][card["precision"]]
    assert set(blocks) == {"sentence-transformers/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2-int8"}
    assert 0.6 < blocks["sentence-transformers/all-MiniLM-L6-v2-int8"]["floor_matched"]["floor"] < 0.9
    assert all(m["serving_ms"] > 0 for m in card["metrics"].values())
    cal = blocks["sentence-transformers/all-MiniLM-L6-v2"]
    assert cal["cosine_floor"] == C.COSINE_FLOOR and cal["workloads"]
    for delta, point in cal["points"].items():  # every chosen threshold holds its bound where it was fitted
        if point is not None:
            assert point["ucb"] <= float(delta) + 1e-9
            assert all(w["fhr"] <= float(delta) + 1e-9 for w in point["workloads"].values())
    assert "training pairs" in proc.stderr and "rule:" in proc.stderr
