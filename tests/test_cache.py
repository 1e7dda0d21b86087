"""The semantic cache through real HTTP: real embedder, real stores, real redis-server, fake upstream,
the official openai SDK. Policy: the static threshold (the learned one has its own tests)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from velo_proxy.state import app_state

ADMIN = "admin-key-for-tests"
THRESHOLD = 0.9


def sdk(server, key: str = "client-key", **headers) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, default_headers=headers or None)


def ask(server, question: str, *, key: str = "client-key", headers: dict | None = None, history: list | None = None,
        model: str = "fake-model", **params):
    messages = (history or []) + [{"role": "user", "content": question}]
    raw = sdk(server, key, **(headers or {})).chat.completions.with_raw_response.create(
        model=model, messages=messages, **params)
    return raw.parse(), raw.headers


def settle(server, timeout_s: float = 10.0) -> dict:
    """Wait until the proxy finished its after-response work (storing answers); return admin stats."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = httpx.get(f"{server.url}/admin/stats", headers={"authorization": f"Bearer {ADMIN}"}).json()
        if stats["pending_tasks"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


@pytest.fixture()
def cache_proxy(make_proxy, embedder_dir):
    return make_proxy(admin_key=ADMIN, similarity_threshold=THRESHOLD)


@pytest.fixture(scope="module")
def paraphrase(test_data):
    pairs = json.loads((test_data / "pairs" / "gptcache-mock-paraphrases.json").read_text())
    return pairs[0]["origin"], pairs[0]["similar"]  # cosine 0.97 with MiniLM


def test_repeat_is_exact_hit_and_paraphrase_is_semantic_hit(cache_proxy, upstream_requests, paraphrase):
    original, similar = paraphrase
    first, h1 = ask(cache_proxy, original)
    assert h1["x-velo-action"] == "B" and h1["x-velo-entry"]
    assert settle(cache_proxy)["store"]["entries"] == 1

    again, h2 = ask(cache_proxy, original)
    assert h2["x-velo-action"] == "exact" and h2["x-velo-entry"] == h1["x-velo-entry"]
    assert again.choices[0].message.content == first.choices[0].message.content

    para, h3 = ask(cache_proxy, similar)
    assert h3["x-velo-action"] == "A"
    assert float(h3["x-velo-similarity"]) >= THRESHOLD
    assert h3["x-velo-entry"] == h1["x-velo-entry"]
    assert para.choices[0].message.content == first.choices[0].message.content
    assert para.id.startswith("chatcmpl-velo-") and para.model == "fake-model"
    assert len(upstream_requests) == 1

    unrelated, h4 = ask(cache_proxy, "What is the boiling point of water at the top of Mount Everest?")
    assert h4["x-velo-action"] == "B"
    assert unrelated.choices[0].message.content.endswith("Mount Everest?")
    assert len(upstream_requests) == 2


def test_streamed_hit_replays_sse(cache_proxy, paraphrase):
    original, similar = paraphrase
    first, _ = ask(cache_proxy, original)
    settle(cache_proxy)
    stream = sdk(cache_proxy).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": similar}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    with httpx.stream("POST", f"{cache_proxy.url}/v1/chat/completions", json={
            "model": "fake-model", "stream": True, "messages": [{"role": "user", "content": similar}]}) as response:
        assert response.headers["x-velo-action"] in ("A", "exact")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


async def test_streamed_answer_is_cached_once_complete(cache_proxy, upstream_requests):
    async with openai.AsyncOpenAI(base_url=f"{cache_proxy.url}/v1", api_key="k", max_retries=0) as aclient:
        stream = await aclient.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "Explain how tides work."}], stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        settle(cache_proxy)
        cached = await aclient.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": "Explain how tides work."}])
    assert cached.headers["x-velo-action"] == "exact"
    assert cached.parse().choices[0].message.content == streamed
    assert len(upstream_requests) == 1


async def test_concurrent_hits_count_every_use(cache_proxy, upstream_requests):
    """Uses of concurrent requests are written in batches (one store transaction each): none is lost or
    counted twice, and the store never falls behind into timeouts."""
    question = "Which planet has the most moons?"
    _, first = ask(cache_proxy, question)
    settle(cache_proxy)
    async with openai.AsyncOpenAI(base_url=f"{cache_proxy.url}/v1", api_key="k", max_retries=0) as aclient:
        async def one():
            raw = await aclient.chat.completions.with_raw_response.create(
                model="fake-model", messages=[{"role": "user", "content": question}])
            return raw.headers["x-velo-action"]

        actions = await asyncio.gather(*[one() for _ in range(120)])
    assert actions == ["exact"] * 120 and len(upstream_requests) == 1
    settle(cache_proxy)
    entry = httpx.get(f"{cache_proxy.url}/admin/entries/{first['x-velo-entry']}",
                      headers={"authorization": f"Bearer {ADMIN}"}).json()
    assert entry["use_count"] == 120
    assert 'component="store"' not in httpx.get(f"{cache_proxy.url}/metrics").text


def test_broken_stream_is_not_cached(cache_proxy, upstream_requests):
    question = "one two three four five six"
    with pytest.raises(openai.APIError):
        list(sdk(cache_proxy).chat.completions.create(
            model="fake-drop", messages=[{"role": "user", "content": question}], stream=True))
    assert settle(cache_proxy)["store"]["entries"] == 0
    _, headers = ask(cache_proxy, question, model="fake-drop")
    assert headers["x-velo-action"] == "B"


def test_tenants_never_share_entries(cache_proxy, upstream_requests):
    q = "What is the capital of Australia?"
    _, h_alice = ask(cache_proxy, q, headers={"x-velo-tenant": "alice"})
    settle(cache_proxy)
    _, h_alice2 = ask(cache_proxy, q, headers={"x-velo-tenant": "alice"})
    _, h_bob = ask(cache_proxy, q, headers={"x-velo-tenant": "bob"})
    assert (h_alice["x-velo-action"], h_alice2["x-velo-action"], h_bob["x-velo-action"]) == ("B", "exact", "B")
    assert h_bob["x-velo-similarity"] == ""  # bob's scope is empty: nothing of alice's was even a candidate
    assert len(upstream_requests) == 2


def test_proxy_keys_scope_the_cache_and_headers_only_narrow(make_proxy, embedder_dir, upstream_requests):
    import hashlib

    proxy = make_proxy(admin_key=ADMIN, similarity_threshold=THRESHOLD, api_keys="key-one,key-two")
    q = "How many moons does Mars have?"
    _, h1 = ask(proxy, q, key="key-one")
    settle(proxy)
    assert ask(proxy, q, key="key-one")[1]["x-velo-action"] == "exact"
    assert ask(proxy, q, key="key-two")[1]["x-velo-action"] == "B"
    # key-two naming key-one's tenant in the header still stays inside key-two
    key_one_tenant = "key:" + hashlib.sha256(b"key-one").hexdigest()[:16]
    assert ask(proxy, q, key="key-two", headers={"x-velo-tenant": key_one_tenant})[1]["x-velo-action"] == "B"
    # key-one narrowing to a sub-tenant does not see its base entries either
    assert ask(proxy, q, key="key-one", headers={"x-velo-tenant": "team-a"})[1]["x-velo-action"] == "B"
    assert len(upstream_requests) == 4


def test_same_follow_up_in_two_conversations_does_not_hit(cache_proxy, upstream_requests):
    conv_a = [{"role": "user", "content": "Who wrote Hamlet?"}, {"role": "assistant", "content": "William Shakespeare."}]
    conv_b = [{"role": "user", "content": "Who painted the Mona Lisa?"}, {"role": "assistant", "content": "Leonardo da Vinci."}]
    _, h_a = ask(cache_proxy, "How old is he?", history=conv_a)
    settle(cache_proxy)
    _, h_a2 = ask(cache_proxy, "How old is he?", history=conv_a)
    _, h_b = ask(cache_proxy, "How old is he?", history=conv_b)
    assert (h_a["x-velo-action"], h_a2["x-velo-action"], h_b["x-velo-action"]) == ("B", "exact", "B")
    _, h_sys = ask(cache_proxy, "How old is he?", history=[{"role": "system", "content": "Answer in French."}] + conv_a)
    assert h_sys["x-velo-action"] == "B"
    _, h_model = ask(cache_proxy, "How old is he?", history=conv_a, model="fake-other")
    assert h_model["x-velo-action"] == "B"
    assert len(upstream_requests) == 4


@pytest.mark.parametrize("params, headers, reason", [
    ({"n": 2}, None, "n>1"),
    ({"temperature": 1.5}, None, "temperature above cap"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, None, "tools"),
    ({}, {"cache-control": "no-store"}, "no-store"),
])
def test_uncacheable_requests_are_not_stored(cache_proxy, upstream_requests, params, headers, reason):
    q = f"Uncacheable question about {reason}?"
    ask(cache_proxy, q, headers=headers, **params)
    assert settle(cache_proxy)["store"]["entries"] == 0, reason
    _, again = ask(cache_proxy, q)
    assert again["x-velo-action"] == "B"


def test_error_and_truncated_answers_are_not_stored(cache_proxy, upstream_requests):
    with pytest.raises(openai.BadRequestError):
        ask(cache_proxy, "Make the upstream fail", model="fake-error-400")
    ask(cache_proxy, "A truncated answer", model="fake-length")
    ask(cache_proxy, "Call a tool", model="fake-tools")
    assert settle(cache_proxy)["store"]["entries"] == 0


def test_no_cache_skips_lookup_but_stores(cache_proxy, upstream_requests):
    q = "What is the speed of light in vacuum?"
    ask(cache_proxy, q)
    settle(cache_proxy)
    _, fresh = ask(cache_proxy, q, headers={"cache-control": "no-cache"})
    assert fresh["x-velo-action"] == "B" and len(upstream_requests) == 2


def test_headers_on_every_response(cache_proxy):
    _, headers = ask(cache_proxy, "Header check question", temperature=1.9)
    for name in ("x-velo-action", "x-velo-similarity", "x-velo-entry", "x-velo-policy", "x-request-id"):
        assert name in headers


def test_admin_api(cache_proxy, upstream_requests):
    auth = {"authorization": f"Bearer {ADMIN}"}
    _, h1 = ask(cache_proxy, "What is the tallest mountain?", headers={"x-velo-tenant": "t1"})
    ask(cache_proxy, "What is the longest river?", headers={"x-velo-tenant": "t1"})
    ask(cache_proxy, "What is the largest ocean?", headers={"x-velo-tenant": "t2"})
    stats = settle(cache_proxy)
    assert stats["store"]["entries"] == 3 and sorted(stats["store"]["scopes"].values()) == [1, 2]
    assert httpx.get(f"{cache_proxy.url}/admin/stats").status_code == 401
    assert httpx.get(f"{cache_proxy.url}/admin/stats", headers={"authorization": "Bearer nope"}).status_code == 401

    entry = httpx.get(f"{cache_proxy.url}/admin/entries/{h1['x-velo-entry']}", headers=auth).json()
    assert entry["question"] == "What is the tallest mountain?"
    assert httpx.delete(f"{cache_proxy.url}/admin/entries/{h1['x-velo-entry']}", headers=auth).json()["deleted"]
    assert httpx.delete(f"{cache_proxy.url}/admin/entries/{h1['x-velo-entry']}", headers=auth).status_code == 404
    # the exact tier's copy of a deleted entry is stale, so the question goes upstream again
    _, again = ask(cache_proxy, "What is the tallest mountain?", headers={"x-velo-tenant": "t1"})
    assert again["x-velo-action"] == "B"
    settle(cache_proxy)

    purged = httpx.delete(f"{cache_proxy.url}/admin/scopes/{entry['scope']}", headers=auth).json()
    assert purged["deleted"] == 2
    assert settle(cache_proxy)["store"]["entries"] == 1
    _, after = ask(cache_proxy, "What is the longest river?", headers={"x-velo-tenant": "t1"})
    assert after["x-velo-action"] == "B"


def test_admin_disabled_without_key(make_proxy, embedder_dir):
    proxy = make_proxy()
    assert httpx.get(f"{proxy.url}/admin/stats").status_code == 404


def test_metrics_show_hits_and_latencies(cache_proxy, paraphrase):
    original, similar = paraphrase
    ask(cache_proxy, original)
    settle(cache_proxy)
    ask(cache_proxy, similar)
    text = httpx.get(f"{cache_proxy.url}/metrics").text
    assert 'velo_requests_total{action="A"} 1.0' in text
    assert 'velo_requests_total{action="B"} 1.0' in text
    assert "velo_cache_hit_ratio 0.5" in text
    for histogram in ("velo_embed_seconds_count", "velo_search_seconds_count", "velo_upstream_seconds_count"):
        assert histogram in text
    assert "velo_store_entries 1.0" in text


def test_cache_survives_restart(make_proxy, embedder_dir, tmp_path, paraphrase, upstream_requests):
    original, similar = paraphrase
    data_dir = tmp_path / "persist"
    first = make_proxy(admin_key=ADMIN, similarity_threshold=THRESHOLD, data_dir=data_dir)
    answer, _ = ask(first, original)
    settle(first)
    first.stop()
    second = make_proxy(admin_key=ADMIN, similarity_threshold=THRESHOLD, data_dir=data_dir)
    again, headers = ask(second, similar)
    assert headers["x-velo-action"] == "A"
    assert again.choices[0].message.content == answer.choices[0].message.content


def test_qdrant_backend(make_proxy, embedder_dir, paraphrase, upstream_requests):
    original, similar = paraphrase
    proxy = make_proxy(admin_key=ADMIN, similarity_threshold=THRESHOLD, qdrant_url=":memory:")
    ask(proxy, original)
    settle(proxy)
    _, headers = ask(proxy, similar)
    assert headers["x-velo-action"] == "A"
    _, other = ask(proxy, similar, headers={"x-velo-tenant": "someone-else"})
    assert other["x-velo-action"] == "B"


def test_entries_expire(make_proxy, embedder_dir, upstream_requests):
    proxy = make_proxy(admin_key=ADMIN, cache_ttl_s=1.0)
    ask(proxy, "Short-lived question?")
    settle(proxy)
    assert ask(proxy, "Short-lived question?")[1]["x-velo-action"] == "exact"
    time.sleep(1.2)
    assert ask(proxy, "Short-lived question?")[1]["x-velo-action"] == "B"


# ----- fail open ----------------------------------------------------------------------------------

def test_redis_exact_tier_and_redis_dying_mid_run(make_proxy, embedder_dir, redis_server, upstream_requests):
    proxy = make_proxy(admin_key=ADMIN, similarity_threshold=THRESHOLD, redis_url=redis_server.url)
    ask(proxy, "Which planet is the largest?")
    settle(proxy)
    import redis

    keys = redis.Redis.from_url(redis_server.url).keys("velo:exact:*")
    assert len(keys) == 1
    assert ask(proxy, "Which planet is the largest?")[1]["x-velo-action"] == "exact"

    redis_server.kill()
    fresh_questions = ["How do bees make honey?", "Why is the sky blue?", "Who invented the telephone?",
                       "What causes earthquakes?", "How far away is the Moon?"]
    for question in fresh_questions:  # every request still answered; the semantic tier serves the repeat
        answer, headers = ask(proxy, "Which planet is the largest?")
        assert headers["x-velo-action"] == "A"
        fresh, fresh_headers = ask(proxy, question)
        assert fresh_headers["x-velo-action"] == "B" and fresh.choices[0].message.content.endswith(question)
    metrics = httpx.get(f"{proxy.url}/metrics").text
    assert 'velo_component_failures_total{component="exact"' in metrics
    ready = httpx.get(f"{proxy.url}/readyz").json()
    assert ready["status"] == "ready" and "degraded" in ready["checks"]["redis"]["detail"]


def test_embedder_timeout_fails_open(make_proxy, embedder_dir, upstream_requests):
    proxy = make_proxy(admin_key=ADMIN, embed_timeout_ms=0.001)
    for i in range(3):
        answer, headers = ask(proxy, f"Question {i} with a hopeless embedding deadline")
        assert headers["x-velo-action"] == "B" and answer.choices[0].message.content
    assert 'velo_component_failures_total{component="embedder",reason="timeout"}' in httpx.get(f"{proxy.url}/metrics").text


def test_missing_embedder_serves_upstream_and_reports_unready(make_proxy, tmp_path, upstream_requests):
    proxy = make_proxy(embedder_dir=tmp_path / "no-model-here")
    answer, headers = ask(proxy, "Does this still work?")
    assert headers["x-velo-action"] == "B" and answer.choices[0].message.content.endswith("still work?")
    ready = httpx.get(f"{proxy.url}/readyz")
    assert ready.status_code == 503
    assert "velo-proxy models export" in ready.json()["checks"]["embedder"]["detail"]


def test_broken_store_fails_open(cache_proxy, paraphrase, upstream_requests):
    original, similar = paraphrase
    ask(cache_proxy, original)
    settle(cache_proxy)
    app_state(cache_proxy.app).services.store.close()  # the store breaks under the running proxy
    for question in (similar, "A question after the store broke"):
        answer, headers = ask(cache_proxy, question)
        assert headers["x-velo-action"] in ("B", "exact") and answer.choices[0].message.content
    assert 'velo_component_failures_total{component="store"' in httpx.get(f"{cache_proxy.url}/metrics").text
