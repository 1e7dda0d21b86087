"""Tenant boundaries beyond lookups, and no noisy neighbour (issue 13). Real proxies, real embedder,
real stores, a real redis-server, the fake upstream and the official openai SDK."""

from __future__ import annotations

import time
from urllib.parse import quote

import httpx
import numpy as np
import openai

from velo_proxy.embedder import MAX_CHARS_PER_TOKEN, OnnxEmbedder
from velo_proxy.services import Breaker

ADMIN = "admin-key-for-tests"
THRESHOLD = 0.9
KEY_A, KEY_B = "tenant-a-key", "tenant-b-key"
# paraphrases written for these tests (MiniLM cosine in brackets)
PASSWORD = ("How do I reset my account password?", "How can I reset the password of my account?")  # 0.99
CAPITAL = ("What is the capital city of Australia?", "Which city is the capital of Australia?")  # 0.97
PHARMACY = ("What time does the pharmacy on Main Street open?", "When does the Main Street pharmacy open?")  # 0.93


def ask(server, question: str, *, key: str = "client-key", **headers):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, default_headers=headers or None)
    raw = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": question}])
    return raw.parse(), raw.headers


def feedback(server, response_id: str, score: float, *, key: str = "client-key", **headers) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/feedback", json={"id": response_id, "score": score},
                      headers={"authorization": f"Bearer {key}", **headers})


def admin(server, method: str, path: str) -> httpx.Response:
    return httpx.request(method, f"{server.url}/admin{path}", headers={"authorization": f"Bearer {ADMIN}"})


def settle(server, timeout_s: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = admin(server, "GET", "/stats").json()
        if stats["pending_tasks"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


# ----- feedback belongs to the tenant that received the response ----------------------------------

def test_feedback_only_from_the_tenant_that_received_the_response(make_proxy, embedder_dir):
    proxy = make_proxy(admin_key=ADMIN, similarity_threshold=THRESHOLD, api_keys=f"{KEY_A},{KEY_B}")
    ask(proxy, PASSWORD[0], key=KEY_A)
    settle(proxy)
    served, headers = ask(proxy, PASSWORD[1], key=KEY_A)
    assert headers["x-velo-action"] == "A" and served.id.startswith("chatcmpl-velo-")
    entry = headers["x-velo-entry"]
    settle(proxy)
    before = admin(proxy, "GET", f"/entries/{entry}").json()

    unknown = feedback(proxy, "chatcmpl-velo-000000000000000000000000", 0.0, key=KEY_B)
    assert unknown.status_code == 404
    for response_id in (served.id, headers["x-velo-request-id"]):
        stolen = feedback(proxy, response_id, 0.0, key=KEY_B)  # tenant B scores A's response
        assert stolen.status_code == 404 and stolen.json() == unknown.json()  # indistinguishable
        narrowed = feedback(proxy, response_id, 0.0, key=KEY_A, **{"x-velo-tenant": "team-x"})
        assert narrowed.status_code == 404 and narrowed.json() == unknown.json()
    settle(proxy)
    after = admin(proxy, "GET", f"/entries/{entry}").json()
    assert (after["use_count"], after["cache_value"]) == (before["use_count"], before["cache_value"])

    own = feedback(proxy, served.id, 0.0, key=KEY_A)
    assert own.status_code == 200 and own.json()["entry"] == entry
    settle(proxy)
    assert admin(proxy, "GET", f"/entries/{entry}").json()["use_count"] == before["use_count"] + 1


def test_client_request_id_is_echoed_but_never_a_feedback_key(make_proxy, embedder_dir):
    proxy = make_proxy(admin_key=ADMIN, similarity_threshold=THRESHOLD)
    shared = "trace-42"  # two tenants happen to send the same x-request-id
    ask(proxy, CAPITAL[0], **{"x-velo-tenant": "alice"})
    ask(proxy, CAPITAL[0], **{"x-velo-tenant": "bob"})
    settle(proxy)
    _, h_alice = ask(proxy, CAPITAL[1], **{"x-velo-tenant": "alice", "x-request-id": shared})
    _, h_bob = ask(proxy, CAPITAL[1], **{"x-velo-tenant": "bob", "x-request-id": shared})
    assert h_alice["x-velo-action"] == h_bob["x-velo-action"] == "A"
    assert h_alice["x-velo-entry"] != h_bob["x-velo-entry"]
    assert h_alice["x-request-id"] == h_bob["x-request-id"] == shared  # echoed for tracing
    assert h_alice["x-velo-request-id"] != h_bob["x-velo-request-id"]
    assert h_alice["x-velo-request-id"].startswith("req-")

    for tenant in ("alice", "bob"):  # the client's id names no response at all
        assert feedback(proxy, shared, 1.0, **{"x-velo-tenant": tenant}).status_code == 404
    given = feedback(proxy, h_alice["x-velo-request-id"], 1.0, **{"x-velo-tenant": "alice"})
    assert given.status_code == 200
    assert given.json()["entry"] == h_alice["x-velo-entry"]
    assert given.json()["request_id"] == h_alice["x-velo-request-id"]
    assert feedback(proxy, h_alice["x-velo-request-id"], 1.0, **{"x-velo-tenant": "bob"}).status_code == 404


# ----- eviction: one tenant's values never set another's bar ----------------------------------------

def test_raising_own_values_does_not_evict_another_tenant(make_proxy, embedder_dir):
    # eviction after every request, no grace period: the below-mean rule applies at once
    proxy = make_proxy(admin_key=ADMIN, similarity_threshold=THRESHOLD, api_keys=f"{KEY_A},{KEY_B}",
                       eviction_interval=1, eviction_grace_s=0.0)
    _, h_a = ask(proxy, PHARMACY[0], key=KEY_A)  # A's entry: cache value 0 (never reused)
    settle(proxy)
    ask(proxy, PASSWORD[0], key=KEY_B)
    settle(proxy)
    for _ in range(3):  # B lifts its own entry's value by reusing it and scoring it 1
        served, h_b = ask(proxy, PASSWORD[1], key=KEY_B)
        assert h_b["x-velo-action"] in ("A", "exact")
        assert feedback(proxy, served.id, 1.0, key=KEY_B).status_code == 200
        settle(proxy)
    assert admin(proxy, "GET", f"/entries/{h_b['x-velo-entry']}").json()["cache_value"] > 0.5
    ask(proxy, "Unrelated, uncached question", key=KEY_B, **{"cache-control": "no-store, no-cache"})  # one more tick
    settle(proxy)
    # A's entry is alone in its scope: at its own scope's mean, not below it
    assert admin(proxy, "GET", f"/entries/{h_a['x-velo-entry']}").status_code == 200
    assert ask(proxy, PHARMACY[0], key=KEY_A)[1]["x-velo-action"] == "exact"


# ----- scope ids are literal -------------------------------------------------------------------------

def test_admin_purge_takes_scope_ids_literally(make_proxy, embedder_dir, redis_server):
    import redis

    proxy = make_proxy(admin_key=ADMIN, similarity_threshold=THRESHOLD, redis_url=redis_server.url)
    _, h_alice = ask(proxy, CAPITAL[0], **{"x-velo-tenant": "alice"})
    _, h_bob = ask(proxy, CAPITAL[0], **{"x-velo-tenant": "bob"})
    settle(proxy)
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert len(r.keys("velo:exact:*")) == 2

    for pattern in ("*", "?" * 32, "[0-9a-f]*", "\\*"):
        purged = admin(proxy, "DELETE", f"/scopes/{quote(pattern, safe='')}")
        assert purged.status_code == 200
        assert (purged.json()["deleted"], purged.json()["exact_deleted"]) == (0, 0), pattern
    assert len(r.keys("velo:exact:*")) == 2
    assert ask(proxy, CAPITAL[0], **{"x-velo-tenant": "alice"})[1]["x-velo-action"] == "exact"

    scope = admin(proxy, "GET", f"/entries/{h_alice['x-velo-entry']}").json()["scope"]
    purged = admin(proxy, "DELETE", f"/scopes/{scope}").json()
    assert (purged["deleted"], purged["exact_deleted"]) == (1, 1)  # the real counts
    assert len(r.keys("velo:exact:*")) == 1
    assert admin(proxy, "GET", f"/entries/{h_bob['x-velo-entry']}").status_code == 200
    assert ask(proxy, CAPITAL[0], **{"x-velo-tenant": "bob"})[1]["x-velo-action"] == "exact"
    assert ask(proxy, CAPITAL[0], **{"x-velo-tenant": "alice"})[1]["x-velo-action"] == "B"


async def test_redis_exact_tier_purges_exactly_one_scope(redis_server):
    import redis.asyncio as aioredis

    from velo_proxy.exact import RedisExactTier

    client = aioredis.from_url(redis_server.url, decode_responses=True)
    tier = RedisExactTier(client)
    try:
        scopes = ["a", "a:b", "*", "[a]", "a\\"]
        for scope in scopes:
            for key in ("0" * 64, "f" * 64):
                await tier.set(scope, key, {"entry": None, "answer": {}}, ttl_s=60)
        assert await tier.purge_scope("*") == 2
        assert await tier.purge_scope("a") == 2  # not the keys of scope "a:b"
        assert await tier.purge_scope("a") == 0
        assert await tier.purge_scope("[a]") == 2
        assert await tier.get("a:b", "0" * 64) is not None and await tier.get("a\\", "f" * 64) is not None
        assert sorted(await client.keys("velo:exact:*")) == sorted(
            f"velo:exact:{s}:{k}" for s in ("a:b", "a\\") for k in ("0" * 64, "f" * 64))
    finally:
        await client.aclose()


# ----- no noisy neighbour ------------------------------------------------------------------------

def big_message(seed: int, size: int = 400_000) -> str:
    words = np.random.default_rng(seed).choice(
        ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"], size // 5)
    return f"Summarise this log ({seed}): " + " ".join(words)[:size]


def test_big_message_does_not_stop_other_clients_semantic_hits(make_proxy, embedder_dir, upstream_requests):
    proxy = make_proxy(admin_key=ADMIN, similarity_threshold=THRESHOLD)  # default embedding deadline
    pairs = (PASSWORD, CAPITAL, PHARMACY)
    for original, _ in pairs:
        ask(proxy, original, **{"x-velo-tenant": "quiet"})
    settle(proxy)
    for round_, (_, paraphrase) in enumerate(pairs):
        answer, headers = ask(proxy, big_message(round_), **{"x-velo-tenant": f"noisy-{round_}"})
        assert headers["x-velo-action"] == "B" and answer.choices[0].message.content
        # right after it, another client still gets its semantic hit
        _, quiet = ask(proxy, paraphrase, **{"x-velo-tenant": "quiet"})
        assert quiet["x-velo-action"] == "A", round_
        settle(proxy)
    metrics = httpx.get(f"{proxy.url}/metrics").text
    assert 'component="embedder",reason="breaker_open"' not in metrics


def test_embedder_bounds_the_text_without_changing_the_vector(embedder_dir):
    embedder = OnnxEmbedder(embedder_dir)
    text = big_message(7)
    bounded = embedder.bounded(text)
    assert len(bounded) <= embedder.max_length * MAX_CHARS_PER_TOKEN < len(text)
    assert text.startswith(bounded) and embedder.bounded(bounded) == bounded
    short = "A short question?"
    assert embedder.bounded(short) == short
    # the same tokens and the same vector as the tokenizer's own truncation of the whole text
    whole = embedder._tokenizer.encode_batch([text])[0]
    ids, mask = embedder.tokenize([text])
    assert ids[0].tolist() == whole.ids and len(whole.ids) == embedder.max_length
    expected = embedder._run_model(np.array([whole.ids]), np.array([whole.attention_mask]))
    np.testing.assert_allclose(embedder.embed_sync([text]), expected, atol=1e-6)
    # and tokenizing costs what the bound costs, not what the 400 KB cost
    t0 = time.perf_counter()
    embedder.tokenize([text])
    bounded_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    embedder._tokenizer.encode_batch([text])
    whole_s = time.perf_counter() - t0
    assert bounded_s < whole_s


def test_breaker_opens_only_after_consecutive_failures():
    breaker = Breaker(cooldown_s=60.0, threshold=3)
    breaker.trip("embedder")
    breaker.trip("embedder")
    assert breaker.allows("embedder")  # two requests failing does not switch the component off
    breaker.succeeded("embedder")
    breaker.trip("embedder")
    breaker.trip("embedder")
    assert breaker.allows("embedder")  # a success in between reset the count
    breaker.trip("embedder")
    assert not breaker.allows("embedder") and breaker.allows("store")
    breaker.succeeded("embedder")
    assert breaker.allows("embedder")

