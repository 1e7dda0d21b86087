"""The learning loop on live signals (velo_proxy.judging, velo_proxy.live_guard, pipeline.learning):
a real proxy with a deliberately loose policy, a fake upstream that answers by meaning (every
question of a cluster gets that cluster's answer), the official openai SDK. Served hits are judged,
the live false-hit estimate passes the bound and the guard tightens, judged near misses are promoted
and then served, and the guard's state survives a restart."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest

from tests.test_cache import ADMIN, settle
from velo_proxy.calibration import wilson_upper
from velo_proxy.judging import JudgeBudget, Label, judge_prompt
from velo_proxy.live_guard import NO_FLOOR, LiveGuard, serving_floor
from velo_proxy.policy import DEFAULT_POLICY_EMBEDDER_ID

S2I = "How do I convert a string to an integer in Python?"
I2S = "How do I convert an integer to a string in Python?"  # cosine 0.996 to S2I: a near miss, not a paraphrase
IBU_WITH = "Can I take ibuprofen with alcohol?"
IBU_WITHOUT = "Can I take ibuprofen without alcohol?"  # 0.945 to IBU_WITH
PARIS = "What is the capital of France?"
PARIS_AGAIN = "Which city is the capital of France?"  # 0.942 to PARIS: a true paraphrase
MEANINGS = {
    S2I: "Call int() on the text; it raises ValueError when the text is not a number.",
    I2S: "Wrap the number in str(), or format it with an f-string.",
    IBU_WITH: "No: alcohol with ibuprofen raises the risk of stomach bleeding.",
    IBU_WITHOUT: "Yes: on its own, take it with food at the labelled dose.",
    PARIS: "Paris is the capital of France.",
    PARIS_AGAIN: "Paris is the capital of France.",
}
LOOSE = 0.6  # a threshold no one should ship: it serves every near miss above


def ask(proxy, question: str, model: str = "fake-meaning") -> tuple[str, dict[str, str]]:
    client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="client-key", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": question}])
    return raw.parse().choices[0].message.content, dict(raw.headers)


def metric(proxy, line_start: str) -> float:
    for line in httpx.get(f"{proxy.url}/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


def guard_of(stats: dict, policy: str = f"threshold-{LOOSE:g}") -> dict:
    return stats["live_guard"]["policies"][policy]


@pytest.fixture()
def meanings(fake_upstream):
    fake_upstream.app.state.meanings = dict(MEANINGS)
    yield fake_upstream.app.state.meanings
    fake_upstream.app.state.meanings = {}


def loose_proxy(make_proxy, data_dir, **overrides):
    settings = {"admin_key": ADMIN, "policy": "threshold", "similarity_threshold": LOOSE, "shadow_rate": 1.0,
                "near_miss_review_rate": 1.0, "near_miss_floor": LOOSE, "data_dir": data_dir}
    return make_proxy(**{**settings, **overrides})


def test_wrong_hits_tighten_the_guard_and_judged_near_misses_are_promoted(make_proxy, embedder_dir, meanings,
                                                                          tmp_path):
    data_dir = tmp_path / "data"
    proxy = loose_proxy(make_proxy, data_dir)

    # 1. A near miss is served (the loose threshold), the shadow check judges it wrong: evicted, and the
    #    live estimate's upper bound is far above delta, so the guard raises the floor past its score.
    assert ask(proxy, S2I)[1]["x-velo-action"] == "B"
    settle(proxy)
    text, headers = ask(proxy, I2S)
    assert headers["x-velo-action"] == "A" and text.endswith(MEANINGS[S2I])  # the wrong answer, served
    served_similarity = float(headers["x-velo-similarity"])
    stats = settle(proxy)
    guard = guard_of(stats)
    assert guard["live"] == {"judged": 1, "wrong": 1, "rate": 1.0, "upper_95": pytest.approx(1.0)}
    assert guard["live"]["upper_95"] > stats["live_guard"]["max_false_hit_rate"]
    assert served_similarity < guard["floor"] <= served_similarity + 1e-4
    assert stats["store"]["entries"] == 0  # the wrongly served entry was evicted
    assert metric(proxy, 'velo_guard_changes_total{direction="tighten",level="policy"}') == 1
    assert metric(proxy, 'velo_judge_calls_total{judge="verifier",kind="shadow",outcome="wrong"}') == 1
    assert metric(proxy, 'velo_live_false_hit_upper{policy="threshold-0.6"}') == pytest.approx(1.0)
    assert metric(proxy, 'velo_judge_tokens_total{judge="verifier"}') > 0  # the fresh answer was paid for

    # 2. The next near miss (0.945, above the loose threshold, below the floor) is forwarded by the guard;
    #    its review judges the candidate wrong, which keeps the floor up.
    assert ask(proxy, IBU_WITH)[1]["x-velo-action"] == "B"
    settle(proxy)
    text, headers = ask(proxy, IBU_WITHOUT)
    assert headers["x-velo-action"] == "B" and text.endswith(MEANINGS[IBU_WITHOUT])
    assert metric(proxy, "velo_guard_blocked_total") == 1
    settle(proxy)
    assert metric(proxy, 'velo_judge_calls_total{judge="verifier",kind="near_miss",outcome="wrong"}') == 1
    assert metric(proxy, "velo_promotions_total") == 0

    # 3. A true paraphrase is held back too, but its review approves the candidate: promoted, the same
    #    request is then served the judged cached answer (not the one it got from upstream).
    first, _ = ask(proxy, PARIS)
    settle(proxy)
    fresh, headers = ask(proxy, PARIS_AGAIN)
    assert headers["x-velo-action"] == "B" and fresh != first
    alias_id = headers["x-velo-entry"]
    stats = settle(proxy)
    assert metric(proxy, "velo_promotions_total") == 1
    again, headers = ask(proxy, PARIS_AGAIN)
    assert headers["x-velo-action"] == "exact" and again == first and headers["x-velo-entry"] == alias_id
    entry = httpx.get(f"{proxy.url}/admin/entries/{alias_id}", headers={"authorization": f"Bearer {ADMIN}"}).json()
    assert entry["question"] == PARIS_AGAIN and entry["answer"]["alias_of"] and entry["answer"]["message"]["content"] == first

    # Every judgement is a labelled pair with its provenance.
    labels = [json.loads(line) for line in (data_dir / "judged" / "labels.jsonl").read_text().splitlines()]
    assert [(lb["kind"], lb["correct"], lb["promoted"]) for lb in labels] == [
        ("shadow", False, False), ("near_miss", False, False), ("near_miss", True, True)]
    assert labels[0]["question"] == I2S and labels[0]["cached_question"] == S2I
    assert all(lb["policy"] == "threshold-0.6" and lb["judge"] == "verifier" and lb["scope"] for lb in labels)
    assert guard_of(stats)["judgements"] == 3 and guard_of(stats)["live"]["judged"] == 1
    floor = guard_of(stats)["floor"]

    # 4. The guard's state survives a restart: rebuilt from the stored judgements.
    proxy.stop()
    restarted = loose_proxy(make_proxy, data_dir)
    after = settle(restarted)
    assert guard_of(after)["floor"] == floor and guard_of(after)["judgements"] == 3
    assert ask(restarted, "Could I take ibuprofen with a glass of wine?")[1]["x-velo-action"] == "B"


def test_the_llm_judge_asks_the_configured_model_and_its_tokens_are_counted(make_proxy, embedder_dir, meanings,
                                                                            upstream_requests, tmp_path):
    proxy = loose_proxy(make_proxy, tmp_path / "data", judge="llm", judge_model="fake-judge")
    first, _ = ask(proxy, PARIS)
    settle(proxy)
    assert ask(proxy, PARIS_AGAIN)[1]["x-velo-action"] == "A"  # a right hit
    settle(proxy)
    ask(proxy, S2I)
    settle(proxy)
    assert ask(proxy, I2S)[1]["x-velo-action"] == "A"  # a wrong hit
    stats = settle(proxy)
    judge_requests = [r["body"] for r in upstream_requests if r["body"]["model"] == "fake-judge"]
    assert len(judge_requests) == 2 and all(r["temperature"] == 0 for r in judge_requests)
    assert judge_requests[0]["messages"] == judge_prompt(PARIS_AGAIN, first)
    assert metric(proxy, 'velo_judge_calls_total{judge="llm",kind="shadow",outcome="correct"}') == 1
    assert metric(proxy, 'velo_judge_calls_total{judge="llm",kind="shadow",outcome="wrong"}') == 1
    assert metric(proxy, 'velo_judge_tokens_total{judge="llm"}') > 0
    assert guard_of(stats)["live"] == {"judged": 2, "wrong": 1, "rate": 0.5, "upper_95": pytest.approx(
        wilson_upper(1, 2), abs=1e-6)}
    # the LLM judge needs no fresh answer: no second upstream call for the served questions
    assert [r["body"]["model"] for r in upstream_requests].count("fake-meaning") == 2


def test_judging_stops_at_its_budget(make_proxy, embedder_dir, meanings, tmp_path):
    proxy = loose_proxy(make_proxy, tmp_path / "data", judge_budget_per_min=1, near_miss_review_rate=0.0)
    ask(proxy, PARIS)
    settle(proxy)
    for paraphrase in (PARIS_AGAIN, "Tell me the capital city of France.", "Name the capital of France."):
        assert ask(proxy, paraphrase)[1]["x-velo-action"] == "A"
        settle(proxy)
    assert metric(proxy, 'velo_judge_calls_total{judge="verifier",kind="shadow",outcome="correct"}') == 1
    assert metric(proxy, 'velo_judge_calls_total{judge="verifier",kind="shadow",outcome="over_budget"}') == 2


def test_llm_judge_needs_a_model():
    from velo_proxy.settings import Settings

    with pytest.raises(ValueError, match="VELO_JUDGE_MODEL"):
        Settings(judge="llm")


# ----- the parts, alone ------------------------------------------------------------------------------

def test_wilson_upper_bound():
    assert wilson_upper(0, 0) == 1.0
    assert wilson_upper(0, 135) < 0.02 < wilson_upper(0, 130)  # z^2/(n+z^2) for no errors
    assert wilson_upper(5, 100) == pytest.approx(0.0992, abs=1e-4)  # by hand: (0.0635 + 0.0383) / 1.0271
    assert wilson_upper(100, 100) == 1.0


def test_serving_floor_is_the_loosest_that_keeps_the_bound():
    ok = [(0.90, True)] * 50
    assert serving_floor(ok, 0.02) == NO_FLOOR  # no wrong judgement: no floor
    assert serving_floor(ok + [(0.95, False)], 0.02) == math.nextafter(0.95, math.inf)
    # enough right judgements above a wrong one bring the bound under delta: no floor needed
    assert serving_floor([(0.99, True)] * 400 + [(0.95, False)], 0.02) == NO_FLOOR
    # the floor goes past the lowest wrong ones only as far as needed
    many = [(0.97, True)] * 250 + [(0.80, False), (0.85, False)]  # 2 of 252: upper 0.024; 1 of 251: 0.018
    assert serving_floor(many, 0.02) == math.nextafter(0.80, math.inf)
    assert serving_floor([(0.97, True)] * 100 + [(0.80, False), (0.85, False)], 0.02) == math.nextafter(0.85, math.inf)
    assert serving_floor([(1.0, False)], 0.02) > 1.0  # a wrong hit at the top: semantic serving stops


def test_live_guard_keys_scopes_and_ages_judgements_out():
    now = [1000.0]
    guard = LiveGuard(max_false_hit_rate=0.05, window=50, max_age_s=100, min_scope_judgements=3,
                      clock=lambda: now[0])

    def label(scope: str, score: float, correct: bool, kind: str = "shadow") -> Label:
        return Label(kind=kind, judge="verifier", correct=correct, question="q", cached_question="c", entry="e",
                     scope=scope, policy="p", similarity=score, verifier_score=score, served_score=score, ts=now[0])

    guard.observe(label("a", 0.9, False))
    assert guard.floor("p", "a") == guard.floor("p", "b") == math.nextafter(0.9, math.inf)
    for _ in range(3):
        guard.observe(label("b", 0.95, False))
    # scope b has a guard of its own now (3 judgements), stricter than the policy's
    assert guard.floor("p", "b") == math.nextafter(0.95, math.inf)
    assert guard.floor("p", "a") == math.nextafter(0.95, math.inf)  # a has too few: it shares the policy's
    for _ in range(3):  # a now has judgements enough of its own: b's traffic no longer moves its floor
        guard.observe(label("a", 0.97, True))
    assert guard.floor("p", "a") == math.nextafter(0.9, math.inf)
    assert guard.floor("p", "b") == math.nextafter(0.95, math.inf)
    assert guard.estimate("p").judged == 7 and guard.estimate("p", "b").wrong == 3
    now[0] += 161  # every judgement is now older than max_age_s: they age out when the floor is read
    assert guard.floor("p", "a") == NO_FLOOR
    off = LiveGuard(max_false_hit_rate=0.05, window=50, max_age_s=100, min_scope_judgements=3, enabled=False)
    off.observe(label("a", 0.9, False))
    assert off.floor("p", "a") == NO_FLOOR and off.stats()["enabled"] is False


def test_judge_budget_refills_over_time():
    now = [0.0]
    budget = JudgeBudget(per_min=2, clock=lambda: now[0])
    assert budget.try_spend() and budget.try_spend() and not budget.try_spend()
    now[0] += 30
    assert budget.try_spend() and not budget.try_spend()


# ----- retraining from what was judged ----------------------------------------------------------------

def qqp_workload(test_data, pairs: int) -> tuple[list[str], dict[str, str]]:
    """The first ``pairs`` QQP dev pairs of the fixture as a stream (both texts, shuffled with a fixed
    seed) and one answer per cluster (duplicates joined transitively)."""
    import random

    rows = [json.loads(line) for line in (test_data / "pairs" / "qqp-dev.jsonl").read_text().splitlines()][:pairs]
    parent: dict[str, str] = {}

    def root(t: str) -> str:
        parent.setdefault(t, t)
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    for row in rows:
        root(row["q1"]), root(row["q2"])
        if row["duplicate"]:
            parent[root(row["q1"])] = root(row["q2"])
    texts = sorted(parent)
    random.Random(0).shuffle(texts)
    clusters = {r: i for i, r in enumerate(sorted({root(t) for t in texts}))}
    return texts, {t: f"Answer {clusters[root(t)]} of the benchmark." for t in texts}


def test_retrain_publishes_a_better_verifier_calibration_and_proxies_reload_it(make_proxy, embedder_dir,
                                                                             verifier_dir, fake_upstream, test_data,
                                                                             tmp_path):
    """Judged live traffic (QQP dev through a verified proxy at delta = 0.1, the oracle LLM judge of the
    fake upstream) -> `velo-proxy retrain --stages verifier` fits the head and thresholds on it and
    publishes them only because they beat the current ones on held-out judged pairs -> the running proxy
    swaps the recalibrated policy in while a client keeps asking, and no request fails."""
    import subprocess
    import sys
    import threading

    texts, meanings = qqp_workload(test_data, 320)
    fake_upstream.app.state.meanings = meanings
    data_dir, policy_dir = tmp_path / "data", tmp_path / "policies"
    proxy = make_proxy(admin_key=ADMIN, policy="verified", max_false_hit_rate=0.1, shadow_rate=1.0,
                       near_miss_review_rate=1.0, near_miss_floor=0.8, judge="llm", judge_model="fake-judge",
                       judge_budget_per_min=100_000, live_guard=False, data_dir=data_dir, policy_dir=policy_dir,
                       policy_reload_s=0.2)
    try:
        client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="k", max_retries=0)
        for text in texts:
            client.chat.completions.create(model="fake-meaning", messages=[{"role": "user", "content": text}])
        settle(proxy, timeout_s=60)
        labels_file = data_dir / "judged" / "labels.jsonl"
        labels = [json.loads(line) for line in labels_file.read_text().splitlines()]
        assert len(labels) >= 60 and {lb["kind"] for lb in labels} == {"shadow", "near_miss"}
        assert {lb["embedder"] for lb in labels} == {DEFAULT_POLICY_EMBEDDER_ID}  # whose cosines they hold
        before = ask(proxy, texts[0])[1]["x-velo-policy"]

        failures: list[BaseException] = []
        versions: set[str] = set()
        stop = threading.Event()

        def keep_asking() -> None:
            asker = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="k", max_retries=0)
            i = 0
            while not stop.is_set():
                try:
                    raw = asker.chat.completions.with_raw_response.create(
                        model="fake-meaning", messages=[{"role": "user", "content": texts[i % len(texts)]}])
                    versions.add(raw.headers["x-velo-policy"])
                except BaseException as exc:  # noqa: BLE001
                    failures.append(exc)
                i += 1

        asker = threading.Thread(target=keep_asking)
        asker.start()
        try:
            done = subprocess.run([sys.executable, "-m", "velo_proxy", "retrain", "--stages", "verifier", "--labels",
                                   str(labels_file), "--policy-dir", str(policy_dir), "--max-false-hit-rate", "0.1",
                                   "--verifier-dir", str(verifier_dir)], capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
            report = json.loads(done.stdout)["verifier"]
            assert report["published"] is True, report
            assert (report["embedder"], report["labels_of_other_embedders"]) == (DEFAULT_POLICY_EMBEDDER_ID, 0)
            result = report["evaluation"]
            assert result["candidate"]["net"] > result["current"]["net"]
            published = json.loads((policy_dir / "VERIFIER").read_text())
            assert published["version"] == report["version"] and len(published["head"]) == 3
            import time

            deadline = time.monotonic() + 20
            while not any(report["version"] in v for v in versions) and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            stop.set()
            asker.join(30)
        assert not failures, failures[:3]
        assert before in versions and f"{before}+{report['version']}" in versions
        assert metric(proxy, "velo_policy_reloads_total") == 1
    finally:
        fake_upstream.app.state.meanings = {}


def test_retrain_without_enough_judged_pairs_publishes_nothing(tmp_path, verifier_dir):
    import subprocess
    import sys

    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps(Label(kind="shadow", judge="llm", correct=True, question="a", cached_question="b",
                                       entry="e", scope="s", policy="p", similarity=0.9, verifier_score=0.9,
                                       served_score=0.9).to_json()) + "\n")
    done = subprocess.run([sys.executable, "-m", "velo_proxy", "retrain", "--stages", "verifier", "--labels", str(labels),
                           "--policy-dir", str(tmp_path / "policies"), "--verifier-dir", str(verifier_dir)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)["verifier"]
    assert report["published"] is False and "distinct judged pairs" in report["reason"]
    assert not (tmp_path / "policies" / "VERIFIER").exists()


def test_a_verifier_recalibration_is_fitted_and_taken_for_one_embedder(tmp_path, verifier_dir):
    """A judged pair's similarity is one embedder's cosine (e5 puts unrelated questions near 0.8, MiniLM near
    0.2), and a recalibration's head reads it and its floor is one. The verifier stage reads only the
    configured embedder's pairs and starts from the verifier's calibration for that embedder; a published
    record applies only to proxies serving that verifier with that embedder."""
    from policy.retrain_verifier import VerifierRetrainConfig, current_recalibration, run
    from velo_proxy import e5_export
    from velo_proxy.policy_dir import PolicyDirectory
    from velo_proxy.verifier import IDENTITY_HEAD, PairVerifier, recalibration_applies

    e5 = e5_export.embedder_id("q4")

    def labels(embedder: str, n: int = 80) -> list[Label]:
        return [Label(kind="shadow", judge="llm", correct=i % 2 == 0, question=f"q{i}", cached_question=f"c{i}",
                      entry=f"e{i}", scope="s", policy="p", similarity=0.9, verifier_score=0.9, served_score=0.9,
                      embedder=embedder) for i in range(n)]

    directory = PolicyDirectory(tmp_path / "policies")
    report = run(VerifierRetrainConfig(policy_dir=directory.root, verifier_dir=verifier_dir, embedder_id=e5),
                 labels(DEFAULT_POLICY_EMBEDDER_ID) + labels(""))
    assert report["published"] is False and report["labels_of_other_embedders"] == 160
    assert report["reason"] == "only 0 distinct judged pairs (< 60)"
    report = run(VerifierRetrainConfig(policy_dir=directory.root, verifier_dir=verifier_dir, embedder_id="x/other"),
                 labels("x/other"))
    assert report["published"] is False and "has no calibration for embedder x/other" in report["reason"]

    with_minilm = PairVerifier(verifier_dir, embedder_id=DEFAULT_POLICY_EMBEDDER_ID)
    with_e5 = PairVerifier(verifier_dir, embedder_id=e5)
    try:
        assert (with_minilm.id, with_e5.embedder_id) == (with_e5.id, e5)
        # the prior of each embedder's fit is its own block: e5's floor sits far above MiniLM's
        assert current_recalibration(directory, with_e5)["cosine_floor"] == with_e5.calibration["cosine_floor"] > 0.9
        assert current_recalibration(directory, with_minilm)["cosine_floor"] == 0.75
        record = {"version": "vcal-minilm", "verifier_id": with_e5.id, "embedder_id": DEFAULT_POLICY_EMBEDDER_ID,
                  "head": [2.0, 0.0, 0.0], "thresholds": with_minilm.calibration["thresholds"], "cosine_floor": 0.75,
                  "top_k": 3}
        directory.publish_verifier_recalibration(record)
        assert recalibration_applies(record, with_minilm) and not recalibration_applies(record, with_e5)
        assert current_recalibration(directory, with_minilm)["version"] == "vcal-minilm"
        ignored = current_recalibration(directory, with_e5)
        assert ignored["version"] == f"{with_e5.id}-shipped" and ignored["head"] == list(IDENTITY_HEAD)
    finally:
        with_minilm.close()
        with_e5.close()


def test_with_redis_the_judgements_are_shared_and_survive_a_restart(make_proxy, embedder_dir, meanings,
                                                                    redis_server, tmp_path):
    """With Redis the judged pairs go to the stream every proxy and the retrain job read; a proxy started
    later (another node, or a restart) rebuilds the same guard from it."""
    import redis

    proxy = loose_proxy(make_proxy, tmp_path / "a", redis_url=redis_server.url)
    ask(proxy, S2I)
    settle(proxy)
    assert ask(proxy, I2S)[1]["x-velo-action"] == "A"
    floor = guard_of(settle(proxy))["floor"]
    assert floor is not None
    stream = redis.Redis.from_url(redis_server.url, decode_responses=True).xrange("velo:labels")
    assert [json.loads(fields["label"])["question"] for _, fields in stream] == [I2S]
    other = loose_proxy(make_proxy, tmp_path / "b", redis_url=redis_server.url)  # its own data dir: state from Redis
    stats = settle(other)
    assert guard_of(stats)["floor"] == floor and stats["labels"] == "redis:velo:labels"
    assert not (tmp_path / "b" / "judged").exists()


def test_live_guard_tracks_a_bounded_number_of_scopes():
    guard = LiveGuard(max_false_hit_rate=0.05, window=10, max_age_s=1e9, min_scope_judgements=1, max_scopes=4)
    for i in range(10):
        guard.observe(Label(kind="shadow", judge="verifier", correct=False, question="q", cached_question="c",
                            entry="e", scope=f"s{i}", policy="p", similarity=0.9, verifier_score=None,
                            served_score=0.9))
    scopes = guard.stats()["policies"]["p"]["scopes"]
    assert sorted(scopes) == ["s7", "s8", "s9"] and guard.stats()["policies"]["p"]["judgements"] == 10


def test_repeats_of_a_semantic_hit_are_held_to_the_guards_floor_too(make_proxy, embedder_dir, meanings, tmp_path):
    """A served semantic hit leaves an exact-tier copy for its verbatim repeats. When the floor rises past the
    score it was served on (here because another near miss was judged wrong), its repeats are not served
    from that copy any more: they go through the decision again, and the guard forwards them."""
    import random

    from velo_proxy.state import app_state

    germany = "What is the capital of Germany?"
    meanings[germany] = "Berlin is the capital of Germany."
    proxy = loose_proxy(make_proxy, tmp_path / "data", shadow_rate=0.5, near_miss_review_rate=0.0)
    loop = app_state(proxy.app).engine.after.learning

    class Scripted(random.Random):
        draws = [0.99, 0.0]  # the first served hit is not checked, the second is

        def random(self) -> float:
            return self.draws.pop(0)

    loop._rng = Scripted()
    ask(proxy, PARIS)
    settle(proxy)
    text, headers = ask(proxy, germany)
    assert headers["x-velo-action"] == "A" and text.endswith(MEANINGS[PARIS])  # wrong, and nobody checked it
    served_on = float(headers["x-velo-similarity"])
    settle(proxy)
    ask(proxy, IBU_WITH)
    settle(proxy)
    assert ask(proxy, IBU_WITHOUT)[1]["x-velo-action"] == "A"  # checked: wrong, the floor rises past 0.94
    floor = guard_of(settle(proxy))["floor"]
    assert floor > served_on
    text, headers = ask(proxy, germany)
    assert headers["x-velo-action"] == "B" and text.endswith(meanings[germany])
    assert metric(proxy, "velo_guard_blocked_total") == 1


def test_an_exact_copy_of_a_semantic_hit_says_what_it_was_served_on(make_proxy, embedder_dir, meanings, tmp_path):
    proxy = loose_proxy(make_proxy, tmp_path / "data", shadow_rate=0.0, near_miss_review_rate=0.0)
    ask(proxy, PARIS)
    settle(proxy)
    _, first = ask(proxy, PARIS_AGAIN)
    settle(proxy)
    _, again = ask(proxy, PARIS_AGAIN)
    assert (first["x-velo-action"], again["x-velo-action"]) == ("A", "exact")
    assert again["x-velo-similarity"] == first["x-velo-similarity"] != "1.0000"  # not a verbatim match of its entry
