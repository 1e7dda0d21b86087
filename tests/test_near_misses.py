"""Near misses through the real proxy: hand-written pairs (tests/data/near_misses.jsonl) of every kind
a sentence vector cannot tell apart (reversed conversions, swapped directions, negation, antonyms,
changed numbers, dates and entities), next to true paraphrases.

The verified policy (the default) at the loosest false-hit bound its calibration supports (the one
that serves the most) serves none of the near misses and some paraphrases; at the default bound
(2 %), which the shipped calibration cannot prove on QQP-shaped traffic (docs/verifier.md), it serves
no semantic hit at all. The plain cosine threshold serves many of the near misses, which is why it is
not the default."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.test_cache import ADMIN, settle

REPO = Path(__file__).resolve().parents[1]
PAIRS = [json.loads(line) for line in (REPO / "tests" / "data" / "near_misses.jsonl").read_text().splitlines() if line]


def ask(server, question: str, tenant: str):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0,
                           default_headers={"x-velo-tenant": tenant})
    raw = client.chat.completions.with_raw_response.create(model="fake-model",
                                                           messages=[{"role": "user", "content": question}])
    return raw.parse(), raw.headers


def run_pairs(server) -> dict[str, list[tuple[dict, str, str]]]:
    """Each pair in its own tenant (scope): cache the first question, then ask the second."""
    out: dict[str, list[tuple[dict, str, str]]] = {"near": [], "same": []}
    for i, pair in enumerate(PAIRS):
        tenant = f"pair-{i}"
        _, h1 = ask(server, pair["cached"], tenant)
        assert h1["x-velo-action"] == "B"
        settle(server)
        _, h2 = ask(server, pair["asked"], tenant)
        out["same" if pair["same"] else "near"].append((pair, h2["x-velo-action"], h2.get("x-velo-verifier", "")))
    return out


def loosest_calibrated_delta(verifier_dir: Path) -> float:
    thresholds = json.loads((verifier_dir / "velo_verifier.json").read_text())["calibration"]["thresholds"]
    assert thresholds, "the shipped verifier carries no calibrated threshold"
    return max(float(d) for d in thresholds)


@pytest.fixture(scope="module")
def default_results(fake_upstream, tmp_path_factory, embedder_dir, verifier_dir):
    from velo_proxy.app import create_app
    from velo_proxy.devtools.server import ServerThread
    from velo_proxy.settings import Settings

    from tests.conftest import UPSTREAM_KEY

    settings = Settings(upstream_base_url=f"{fake_upstream.url}/v1", upstream_api_key=UPSTREAM_KEY,
                        data_dir=tmp_path_factory.mktemp("nm") / "data", admin_key=ADMIN, shadow_rate=0.0,
                        max_false_hit_rate=loosest_calibrated_delta(verifier_dir))
    assert settings.policy == "verified"  # the default policy, untouched
    server = ServerThread(create_app(settings)).start()
    try:
        results = run_pairs(server)
        results["metrics"] = httpx.get(f"{server.url}/metrics").text
        results["ready"] = httpx.get(f"{server.url}/readyz").json()
    finally:
        server.stop()
    return results


@pytest.fixture(scope="module")
def int8_results(fake_upstream, tmp_path_factory, int8_embedder_dir, verifier_dir):
    """The same pairs with the int8 embedder (VELO_EMBEDDER=all-MiniLM-L6-v2-int8): the verifier serves with
    the calibration block it carries for that embedder, at that block's loosest bound."""
    from velo_proxy.app import create_app
    from velo_proxy.devtools.server import ServerThread
    from velo_proxy.model_export import EMBEDDER_ID_INT8
    from velo_proxy.settings import Settings

    from tests.conftest import UPSTREAM_KEY

    blocks = json.loads((verifier_dir / "velo_verifier.json").read_text())["calibrations"]
    assert EMBEDDER_ID_INT8 in blocks, "the shipped verifier is not calibrated for the int8 embedder"
    settings = Settings(upstream_base_url=f"{fake_upstream.url}/v1", upstream_api_key=UPSTREAM_KEY,
                        data_dir=tmp_path_factory.mktemp("nm8") / "data", admin_key=ADMIN, shadow_rate=0.0,
                        embedder="all-MiniLM-L6-v2-int8", embedder_dir=int8_embedder_dir,
                        max_false_hit_rate=max(float(d) for d in blocks[EMBEDDER_ID_INT8]["thresholds"]))
    server = ServerThread(create_app(settings)).start()
    try:
        results = run_pairs(server)
        results["ready"] = httpx.get(f"{server.url}/readyz").json()
    finally:
        server.stop()
    results["block"] = blocks[EMBEDDER_ID_INT8]
    return results


def test_the_int8_embedder_serves_paraphrases_and_no_near_miss(int8_results):
    assert int8_results["ready"]["checks"]["verifier"]["ok"] is True
    served = [(p["kind"], p["asked"]) for p, action, _ in int8_results["near"] if action == "A"]
    assert not served, f"near misses served from the cache with the int8 embedder: {served}"
    hits = [p["asked"] for p, action, _ in int8_results["same"] if action == "A"]
    assert len(hits) >= 2, f"only {len(hits)} paraphrases served with the int8 embedder: {hits}"
    assert "floor_matched" in int8_results["block"]  # its own floor, matched to fp32's share of duplicates


def test_no_near_miss_is_served_at_the_calibrated_bound(default_results):
    served = [(p["kind"], p["asked"], v) for p, action, v in default_results["near"] if action == "A"]
    assert not served, f"near misses served from the cache: {served}"
    kinds = {p["kind"] for p, _, _ in default_results["near"]}
    assert {"conversion", "direction", "negation", "antonym", "number", "date", "entity"} <= kinds


def test_paraphrases_are_still_served(default_results):
    same = default_results["same"]
    hits = [p["asked"] for p, action, _ in same if action == "A"]
    # the verified policy trades recall for precision (measured: 3 of 18 at the shipped threshold); it must
    # still be a semantic cache
    assert len(hits) >= 2, f"only {len(hits)} of {len(same)} paraphrases served: {hits}"


def test_the_default_bound_serves_only_what_is_calibrated(make_proxy, embedder_dir, verifier_dir):
    """VELO_MAX_FALSE_HIT_RATE below every calibrated delta: no semantic hit (never an unproven one), and
    no verifier call either (nothing could be served); exact repeats are still answered from the cache."""
    thresholds = json.loads((verifier_dir / "velo_verifier.json").read_text())["calibration"]["thresholds"]
    strict = min(float(d) for d in thresholds) / 2
    server = make_proxy(policy="verified", max_false_hit_rate=strict, admin_key=ADMIN)
    pair = next(p for p in PAIRS if p["same"] and p["asked"] == "How can I improve my credit score?")
    ask(server, pair["cached"], "t")
    settle(server)
    _, h = ask(server, pair["asked"], "t")
    assert h["x-velo-action"] == "B" and h["x-velo-verifier"] == "" and float(h["x-velo-similarity"]) > 0.75
    _, again = ask(server, pair["cached"], "t")
    assert again["x-velo-action"] == "exact"
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "velo_verifier_pairs_total 0.0" in metrics  # the hot path skipped a call whose answer could not matter
    assert 'velo_verifier_outcomes_total{outcome="no_candidate"} 1.0' in metrics


def test_verifier_scores_are_in_headers_and_metrics(default_results):
    scored = [float(v) for _, _, v in default_results["near"] + default_results["same"] if v]
    assert len(scored) >= len(PAIRS) // 2 and all(0.0 <= s <= 1.0 for s in scored)
    metrics = default_results["metrics"]
    assert 'velo_verifier_outcomes_total{outcome="served"}' in metrics
    assert 'velo_verifier_outcomes_total{outcome="rejected"}' in metrics
    assert "velo_verifier_seconds_count" in metrics and "velo_verifier_pairs_total" in metrics
    assert default_results["ready"]["checks"]["verifier"]["ok"] is True


def test_the_plain_threshold_serves_near_misses(make_proxy, embedder_dir):
    """What the verified default protects against: cosine 0.9 serves several of the same near misses."""
    server = make_proxy(policy="threshold", similarity_threshold=0.9, admin_key=ADMIN)
    results = run_pairs(server)
    served = [p["asked"] for p, action, _ in results["near"] if action == "A"]
    assert len(served) >= 5


def test_a_slow_verifier_fails_safe(make_proxy, embedder_dir, verifier_dir):
    server = make_proxy(policy="verified", verifier_timeout_ms=0.001, admin_key=ADMIN,
                        max_false_hit_rate=loosest_calibrated_delta(verifier_dir))
    pair = next(p for p in PAIRS if p["same"])
    ask(server, pair["cached"], "t")
    settle(server)
    _, h = ask(server, pair["asked"], "t")
    assert h["x-velo-action"] == "B"  # no semantic hit without a verdict
    _, again = ask(server, pair["cached"], "t")
    assert again["x-velo-action"] == "exact"  # exact repeats need no verifier
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'velo_component_failures_total{component="verifier",reason="timeout"}' in metrics
    assert 'velo_verifier_outcomes_total{outcome="failed"}' in metrics


def test_a_missing_verifier_serves_no_semantic_hit_and_says_so(make_proxy, embedder_dir, tmp_path):
    server = make_proxy(policy="verified", verifier_dir=tmp_path / "absent", admin_key=ADMIN)
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 503
    assert "velo-proxy models export" in ready.json()["checks"]["verifier"]["detail"]
    pair = next(p for p in PAIRS if p["same"])
    ask(server, pair["cached"], "t")
    settle(server)
    _, h = ask(server, pair["asked"], "t")
    assert h["x-velo-action"] == "B" and h["x-velo-policy"] == "verified-unavailable"


def test_the_learned_policy_is_verified_too(make_proxy, embedder_dir, verifier_dir):
    server = make_proxy(policy="learned", admin_key=ADMIN, max_false_hit_rate=loosest_calibrated_delta(verifier_dir),
                        verify_learned=True)
    results = run_pairs(server)
    served = [(p["kind"], p["asked"]) for p, action, _ in results["near"] if action == "A"]
    assert not served, f"near misses served by the learned policy: {served}"


def test_the_requests_own_question_is_served_without_the_verifier(make_proxy, embedder_dir, verifier_dir):
    """The same question in the same scope, asked with other answer-shaping parameters (so the exact tier
    misses) or spelled with other case and spacing: its cached answer is served at the default bound,
    which serves no *different* question, and without a verifier call (the cross-encoder, trained on
    distinct pairs, scores identical texts anywhere from 0.06 to 0.93). A one-word change still is not."""
    server = make_proxy(policy="verified", admin_key=ADMIN)  # default bound: no calibrated threshold holds
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0,
                           default_headers={"x-velo-tenant": "t"})

    def chat(question: str, tenant: str = "t", **params):
        raw = client.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": question}],
            extra_headers={"x-velo-tenant": tenant}, **params)
        return raw.parse().choices[0].message.content, raw.headers

    first, h = chat("Can I take ibuprofen with alcohol?", temperature=0)
    assert h["x-velo-action"] == "B"
    settle(server)
    again, h = chat("  can I take IBUPROFEN   with alcohol?", temperature=0.3, seed=7)
    assert h["x-velo-action"] == "A" and again == first
    assert h["x-velo-verifier"] == "" and float(h["x-velo-similarity"]) > 0.99
    _, h = chat("Can I take ibuprofen without alcohol?", temperature=0.3)
    assert h["x-velo-action"] == "B"
    _, h = chat("Can I take ibuprofen with alcohol?", tenant="other", temperature=0.3)
    assert h["x-velo-action"] == "B"  # another tenant's scope
    settle(server)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "velo_same_question_hits_total 1.0" in metrics
    assert "velo_verifier_pairs_total 0.0" in metrics
