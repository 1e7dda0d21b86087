"""The request path's parts as units: the one fail-open guard (deadline, breaker, metric), the
deadlines it takes from the settings, the typed request context (cacheability decided once) and the
rule for which upstream answers may be cached."""

from __future__ import annotations

import asyncio
import time

import pytest

from velo_proxy.metrics import Metrics
from velo_proxy.pipeline.act import cacheable_answer
from velo_proxy.pipeline.context import Caller, Choice, RequestContext
from velo_proxy.pipeline.guard import Breaker, Deadlines, Guard
from velo_proxy.policy import ThresholdPolicy
from velo_proxy.protocol import ChatCompletionRequest
from velo_proxy.settings import Settings
from velo_proxy.upstream import Target


def failures(metrics: Metrics, component: str, reason: str) -> float:
    return metrics.failures.labels(component, reason)._value.get()


@pytest.fixture()
def metrics() -> Metrics:
    return Metrics()


# ----- the guard ------------------------------------------------------------------------------------

async def test_guard_deadline_fails_open_and_counts(metrics):
    guard = Guard(breaker=Breaker(cooldown_s=60.0, threshold=3), metrics=metrics)

    async def slow() -> str:
        await asyncio.sleep(1.0)
        return "late"

    t0 = time.perf_counter()
    assert await guard.call("embedder", slow, deadline_s=0.05) is None
    assert time.perf_counter() - t0 < 0.5  # the deadline, not the call, decides how long it takes
    assert failures(metrics, "embedder", "timeout") == 1

    async def broken() -> str:
        raise ConnectionError("down")

    assert await guard.call("embedder", broken, deadline_s=1.0) is None
    assert failures(metrics, "embedder", "ConnectionError") == 1

    async def fine() -> str:
        return "ok"

    assert await guard.call("embedder", fine, deadline_s=1.0) == "ok"


async def test_guard_breaker_opens_after_consecutive_failures_and_skips_the_component(metrics):
    guard = Guard(breaker=Breaker(cooldown_s=0.2, threshold=2), metrics=metrics)
    calls = []

    async def broken() -> None:
        calls.append(1)
        raise RuntimeError("boom")

    async def fine() -> str:
        calls.append(1)
        return "ok"

    await guard.call("store", broken, deadline_s=1.0)
    assert await guard.call("store", fine, deadline_s=1.0) == "ok"  # a success in between resets the count
    await guard.call("store", broken, deadline_s=1.0)
    await guard.call("store", broken, deadline_s=1.0)  # two in a row: open
    assert len(calls) == 4
    assert await guard.call("store", fine, deadline_s=1.0) is None  # skipped, not paid for
    assert len(calls) == 4 and failures(metrics, "store", "breaker_open") == 1
    assert await guard.call("embedder", fine, deadline_s=1.0) == "ok"  # per component
    await asyncio.sleep(0.25)  # cool-down over: half-open, one call goes through
    assert await guard.call("store", fine, deadline_s=1.0) == "ok"
    assert guard.breaker.allows("store")


async def test_bookkeeping_failures_are_counted_but_never_open_the_breaker(metrics):
    """A use record that times out (background bookkeeping, under load) is counted and logged, but it must
    not switch off the request path's searches by opening the store's breaker; nor does its success
    reset the count of real failures."""
    guard = Guard(breaker=Breaker(cooldown_s=60.0, threshold=2), metrics=metrics)

    async def slow() -> None:
        await asyncio.sleep(1.0)

    async def fine() -> str:
        return "ok"

    for _ in range(5):
        assert await guard.call("store", slow, deadline_s=0.01, bookkeeping=True) is None
    assert failures(metrics, "store", "timeout") == 5
    assert guard.breaker.allows("store")
    assert await guard.call("store", fine, deadline_s=1.0) == "ok"  # a search still runs

    async def broken() -> None:
        raise RuntimeError("disk gone")

    await guard.call("store", broken, deadline_s=1.0)  # one real failure in a row
    assert await guard.call("store", fine, deadline_s=1.0, bookkeeping=True) == "ok"  # does not reset the count
    await guard.call("store", broken, deadline_s=1.0)  # so the second real one opens it
    assert not guard.breaker.allows("store")


def test_guard_run_and_probes(metrics):
    guard = Guard(breaker=Breaker(cooldown_s=60.0, threshold=1), metrics=metrics)

    def broken() -> None:
        raise ValueError("bad policy file")

    assert guard.run("policy", broken) is None  # a policy failing at run time fails open
    assert failures(metrics, "policy", "ValueError") == 1 and not guard.breaker.allows("policy")
    assert guard.run("policy", lambda: "B") is None  # open: skipped
    # a probe (the cheap in-memory "is this entry still stored?") runs while the breaker is open,
    # and its success does not close the breaker: it says nothing of the component's health
    guard.failed("store", "timeout")
    assert not guard.breaker.allows("store")
    assert guard.run("store", lambda: True, probe=True) is True
    assert not guard.breaker.allows("store")
    assert guard.run("store", broken, probe=True) is None and failures(metrics, "store", "ValueError") == 1


def test_deadlines_come_from_the_settings_with_the_former_defaults():
    deadlines = Deadlines.from_settings(Settings())
    assert deadlines == Deadlines(embed=0.5, search=0.2, verify=0.3, exact=0.5, experience=0.5, store_write=1.0,
                                  eviction=30.0)
    tuned = Settings(exact_timeout_ms=80, store_write_timeout_ms=2500, eviction_timeout_s=5)
    assert (Deadlines.from_settings(tuned).exact, Deadlines.from_settings(tuned).store_write,
            Deadlines.from_settings(tuned).eviction) == (0.08, 2.5, 5.0)
    settings = Settings()
    assert (settings.breaker_threshold, settings.breaker_cooldown_s, settings.redis_timeout_ms,
            settings.shutdown_drain_s) == (3, 5.0, 250.0, 5.0)


# ----- the request context ----------------------------------------------------------------------------

def context(messages, headers=None, **body) -> RequestContext:
    payload = {"model": "m", "messages": messages, **body}
    return RequestContext.build(ChatCompletionRequest.model_validate(payload), payload,
                                caller=Caller(tenant="t", client_key=None), target=Target("openai/m", None),
                                request_id="req-1", headers=headers or {}, settings=Settings(),
                                policy=ThresholdPolicy(threshold=0.9))


def test_request_context_decides_cacheability_once():
    plain = context([{"role": "user", "content": "Hi?"}])
    assert plain.lookup_key is plain.store_key is plain.key and plain.key.question == "Hi?"
    assert plain.new_entry and plain.upstream_payload is plain.payload and not plain.stream

    no_store = context([{"role": "user", "content": "Hi?"}], {"cache-control": "no-store"}, stream=True,
                       stream_options={"include_usage": True})
    assert no_store.lookup_key == plain.key and no_store.store_key is None and no_store.new_entry is None
    assert no_store.stream and no_store.include_usage

    # the last turn is not a plain-text user message: neither looked up nor stored, whatever the gate said
    shape = context([{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello"}])
    assert shape.key is None and shape.lookup_key is None and shape.store_key is None and shape.new_entry is None
    assert (shape.gate.lookup, shape.gate.store, shape.gate.reason) == (False, False, "uncacheable shape")
    hot = context([{"role": "user", "content": "Hi?"}], temperature=1.5)
    assert hot.key is None and hot.gate.reason == "temperature above cap"

    # another tenant, same question: another scope
    other = RequestContext.build(plain.chat, plain.payload, caller=Caller(tenant="u", client_key=None),
                                 target=plain.target, request_id="req-2", headers={}, settings=Settings(),
                                 policy=plain.trace.policy)
    assert other.key.scope != plain.key.scope


def test_trace_headers_come_from_the_choice():
    ctx = context([{"role": "user", "content": "Hi?"}])
    assert ctx.trace.headers()["x-velo-action"] == "B" and not Choice().from_cache
    ctx.trace.choice = Choice("exact", answer={"message": {}}, entry="e1", similarity=1.0)
    ctx.trace.entry = "e1"
    assert ctx.trace.choice.from_cache and Choice("A").from_cache and not Choice("C").from_cache
    assert ctx.trace.headers() == {"x-velo-action": "exact", "x-velo-similarity": "1.0000", "x-velo-verifier": "",
                                   "x-velo-entry": "e1", "x-velo-policy": "threshold-0.9"}


def test_only_complete_plain_text_answers_are_cacheable():
    text = {"role": "assistant", "content": "Paris."}
    assert cacheable_answer(text, finished=True, usage={"total_tokens": 3}) == {
        "message": {"role": "assistant", "content": "Paris."}, "finish_reason": "stop", "usage": {"total_tokens": 3}}
    assert cacheable_answer(text, finished=False, usage=None) is None
    assert cacheable_answer({"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}, finished=True,
                            usage=None) is None
    assert cacheable_answer({"role": "assistant", "content": [{"type": "text", "text": "x"}]}, finished=True,
                            usage=None) is None


def test_an_unusable_shipped_policy_falls_back_to_the_verified_policy(metrics, verifier_dir):
    """`VELO_POLICY=learned` with a shipped policy that does not fit the embedder: the proxy falls back to
    the policy that holds the operator's bound (verified), never to the unverified cosine threshold."""
    from types import SimpleNamespace

    from velo_proxy.policy import VerifiedPolicy
    from velo_proxy.policy_manager import PolicyManager
    from velo_proxy.verifier import PairVerifier

    errors: dict[str, str] = {}
    manager = PolicyManager(settings=Settings(policy="learned", max_false_hit_rate=0.1), metrics=metrics,
                            load_errors=errors)
    foreign = SimpleNamespace(id="someone-elses-embedder", dim=384)

    async def start() -> None:
        manager.start(embedder=foreign, verifier=PairVerifier(verifier_dir))
        await manager.aclose()

    asyncio.run(start())
    assert isinstance(manager.current, VerifiedPolicy) and manager.current.verify_rule is not None
    assert "someone-elses-embedder" in errors["policy"]
