"""Property-based fuzzing of POST /v1/chat/completions (hypothesis, fixed seed): a few thousand bodies
built around the chat schema (wrong types, odd unicode including lone surrogates, deep nesting,
NaN/Infinity, huge numbers, unknown and missing fields, broken encodings), all over ONE keep-alive
connection to a real proxy (cache on) in front of the fake upstream.

Properties: every answer is a 200 (a completion, or a stream that ends with [DONE]) or a 4xx in the
OpenAI envelope; the connection stays usable; and afterwards the cache is consistent: a question
asked before still gets its own answer, and the store holds exactly the answers of the successful
requests, none from failed ones."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import UPSTREAM_KEY
from tests.rawhttp import Connection
from velo_proxy.app import create_app
from velo_proxy.devtools.server import ServerThread
from velo_proxy.settings import Settings

EXAMPLES = 2000
ADMIN = "admin-key-for-fuzz"
KNOWN = "What is the capital city of Australia?"

# ----- strategies ---------------------------------------------------------------------------------
SURROGATES = st.sampled_from(["\ud800", "\udfff", "x\udc00y", "\udfff\ud800", "\ud83d"])
ODD = st.sampled_from(["", " ", "\x00", "\u202e\u2066", "🦄" * 8, "\uffff\ufffe", "e\u0301" * 20, "a" * 600,
                       "null", "[DONE]", "\\u0000", "\r\n\r\n"])
TEXT = st.one_of(st.text(max_size=12), ODD, SURROGATES)
NUMBERS = st.one_of(st.integers(-(2 ** 70), 2 ** 70), st.sampled_from([10 ** 400, -(10 ** 400), 0, -1, 2 ** 63]),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -1e-320, 0.5]))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=5)
DEEP = st.integers(20, 1500).map(lambda depth: f"__DEEP_{depth}__")  # spliced in after serialising
ANY = st.one_of(JSON, DEEP)

QUESTION = st.one_of(st.text(min_size=1, max_size=60), ODD, SURROGATES)
ROLE = st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]), ANY)
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(QUESTION, ANY)}),
    st.fixed_dictionaries({"type": st.one_of(st.sampled_from(["image_url", "input_audio", "text", "bogus"]), ANY)},
                          optional={"image_url": ANY, "text": ANY}),
    ANY)
CONTENT = st.one_of(QUESTION, st.none(), st.lists(PART, max_size=3), ANY)
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.just("user"), "content": QUESTION}),
    st.fixed_dictionaries({}, optional={"role": ROLE, "content": CONTENT, "name": st.one_of(TEXT, ANY),
                                        "tool_calls": ANY, "tool_call_id": ANY, "vendor": ANY}))
LAST_USER = st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(QUESTION, st.lists(PART, max_size=2))})
MESSAGES = st.one_of(
    st.tuples(st.lists(MESSAGE, max_size=3), LAST_USER).map(lambda t: t[0] + [t[1]]),
    st.lists(MESSAGE, max_size=4),
    ANY)

# known fields: mostly well-typed values, sometimes anything
KNOWN_FIELDS = {
    "temperature": st.one_of(st.floats(0, 2), st.sampled_from([0, 1, 2.5, -0.1]), ANY),
    "top_p": st.one_of(st.floats(0, 1), ANY),
    "n": st.one_of(st.integers(0, 3), ANY),
    "max_tokens": st.one_of(st.integers(-1, 10 ** 30), ANY),
    "max_completion_tokens": st.one_of(st.integers(1, 100), ANY),
    "seed": st.one_of(st.integers(-(2 ** 80), 2 ** 80), ANY),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=3), ANY),
    "stream": st.one_of(st.booleans(), ANY),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.one_of(st.booleans(), ANY)}), ANY),
    "user": st.one_of(TEXT, ANY),
    "metadata": st.one_of(st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3), ANY),
    "response_format": st.one_of(st.sampled_from([{"type": "text"}, {"type": "json_object"}]), ANY),
    "tools": ANY,
    "tool_choice": st.one_of(st.sampled_from(["none", "auto"]), ANY),
    "logit_bias": ANY,
    "presence_penalty": st.one_of(st.floats(-2, 2), ANY),
}
MODEL = st.one_of(st.just("fake-model"), st.text(min_size=1, max_size=20).filter(lambda m: not m.startswith("fake-")),
                  SURROGATES, ANY)


# well-formed bodies (JSON without NaN or surrogates, values of the right type), for the 200 path
FINE_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.floats(allow_nan=False,
                         allow_infinity=False), st.text(max_size=20))
FINE_JSON = st.recursive(FINE_SCALARS, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=5)
FINE_QUESTION = st.text(min_size=1, max_size=80)
FINE_FIELDS = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "n": st.integers(1, 2),
    "max_tokens": st.integers(1, 10 ** 30), "seed": st.integers(-(2 ** 80), 2 ** 80),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=2)), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "user": st.text(max_size=10),
    "metadata": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]),
    "presence_penalty": st.floats(-2, 2), "top_k": st.integers(1, 50),
}


# (strategies are built once, here: building them inside a draw costs more than the request)
FINE_HISTORY = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "assistant"]),
                                               "content": FINE_QUESTION}), max_size=2)
FINE_LAST = st.one_of(FINE_QUESTION, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": FINE_QUESTION}),
                                              min_size=1, max_size=2))
FINE_NAMES = st.lists(st.sampled_from(sorted(FINE_FIELDS)), max_size=3, unique=True)
VENDOR_NAMES = st.lists(st.text(min_size=1, max_size=10), max_size=2)
KNOWN_NAMES = st.lists(st.sampled_from(sorted(KNOWN_FIELDS)), max_size=4, unique=True)
ONE_KNOWN = st.sampled_from(sorted(KNOWN_FIELDS))
MUTATION = st.sampled_from(["field", "drop-model", "drop-messages", "message", "vendor"])
SMALL = st.integers(0, 9)


@st.composite
def fine_body(draw: Any) -> dict[str, Any]:
    body = {"model": "fake-model", "messages": [*draw(FINE_HISTORY), {"role": "user", "content": draw(FINE_LAST)}]}
    for name in draw(FINE_NAMES):
        body[name] = draw(FINE_FIELDS[name])
    for name in draw(VENDOR_NAMES):
        body.setdefault(name, draw(FINE_JSON))
    return body


@st.composite
def wild_body(draw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if draw(SMALL):  # 1 in 10 without a model
        body["model"] = draw(MODEL)
    if draw(SMALL):
        body["messages"] = draw(MESSAGES)
    for name in draw(KNOWN_NAMES):
        body[name] = draw(KNOWN_FIELDS[name])
    for _ in range(draw(SMALL) // 4):  # unknown (vendor) fields
        body[draw(TEXT)] = draw(ANY)
    return body


@st.composite
def mutated_body(draw: Any) -> dict[str, Any]:
    """A well-formed body with one thing wrong."""
    body = draw(fine_body())
    kind = draw(MUTATION)
    if kind == "field":
        name = draw(ONE_KNOWN)
        body[name] = draw(KNOWN_FIELDS[name])
    elif kind.startswith("drop-"):
        del body[kind.removeprefix("drop-")]
    elif kind == "message":
        body["messages"][draw(SMALL) % len(body["messages"])] = draw(MESSAGE)
    else:
        body[draw(TEXT)] = draw(ANY)
    return body


BODY = st.one_of(fine_body(), mutated_body(), mutated_body(), wild_body(), wild_body())
ENCODING = st.sampled_from(["ascii"] * 6 + ["utf-8", "utf-8", "cesu", "truncated", "array"])


@st.composite
def bodies(draw: Any) -> tuple[dict[str, Any], str]:
    return draw(BODY), draw(ENCODING)


def serialise(body: dict[str, Any], encoding: str) -> bytes:
    if encoding == "array":
        body = [body]  # type: ignore[assignment]
    text = json.dumps(body, ensure_ascii=encoding != "utf-8" and encoding != "cesu", allow_nan=True)
    while "__DEEP_" in text:
        start = text.index('"__DEEP_')
        end = text.index('__"', start) + 3
        depth = int(text[start + 8:end - 3])
        text = text[:start] + "[" * depth + "]" * depth + text[end:]
    # "cesu": lone surrogates written as raw 3-byte sequences, i.e. invalid UTF-8
    data = text.encode("utf-8", "surrogatepass")
    return data[: max(1, len(data) * 2 // 3)] if encoding == "truncated" else data


# ----- checks -------------------------------------------------------------------------------------
def check_answer(status: int, headers: dict[str, str], reply: bytes) -> str | None:
    """Asserts the properties of one answer; returns the id of a cache entry it promises, if any."""
    assert headers.get("connection", "").lower() != "close", (status, reply[:300])
    if 400 <= status < 500:
        assert headers["content-type"].startswith("application/json"), reply[:300]
        error = json.loads(reply)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str) and error["type"]
        assert error["param"] is None or isinstance(error["param"], str)
        assert error["code"] is None or isinstance(error["code"], str)
        return None
    assert status == 200, (status, reply[:500])
    if headers["content-type"].startswith("text/event-stream"):
        events = [e for e in reply.decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]", events[-3:]
        for event in events[:-1]:
            chunk = json.loads(event.removeprefix("data: "))
            assert chunk["object"] == "chat.completion.chunk", chunk  # no error event
    else:
        completion = json.loads(reply)
        assert completion["object"] == "chat.completion" and completion["choices"], completion
    # forwarded answers are stored, the augmented ones (C: e.g. a hit cached in another language) too
    if headers["x-velo-action"] in ("B", "C") and headers.get("x-velo-entry"):
        return headers["x-velo-entry"]
    return None


def admin(server: ServerThread) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)


def settle(server: ServerThread, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        with admin(server) as client:
            stats = client.get("/admin/stats").json()
        if stats["pending_tasks"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


@pytest.fixture(scope="module")
def proxy(fake_upstream, tmp_path_factory, embedder_dir) -> ServerThread:
    # generous deadlines: on a loaded 2-core machine a slow embedding must not fail a store open,
    # which would make the entry count below flaky
    app = create_app(Settings(upstream_base_url=f"{fake_upstream.url}/v1", upstream_api_key=UPSTREAM_KEY,
                              data_dir=tmp_path_factory.mktemp("fuzz"), policy="threshold", shadow_rate=0.0,
                              admin_key=ADMIN, embed_timeout_ms=30_000, search_timeout_ms=30_000,
                              eviction_interval=1_000_000, similarity_threshold=0.95))
    server = ServerThread(app).start()
    yield server
    server.stop()


def ask(conn: Connection, question: str) -> tuple[str, dict[str, str]]:
    status, headers, reply = conn.exchange(json.dumps(
        {"model": "fake-model", "messages": [{"role": "user", "content": question}]}).encode())
    assert status == 200, reply
    return json.loads(reply)["choices"][0]["message"]["content"], headers


def test_fuzzed_requests_get_200_or_a_4xx_envelope_and_leave_the_cache_consistent(proxy):
    conn = Connection(proxy)
    known_answer, first = ask(conn, KNOWN)
    assert first["x-velo-action"] == "B"
    settle(proxy)
    promised = {first["x-velo-entry"]}
    statuses: Counter[str] = Counter()

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(bodies())
    def one_request(case: tuple[dict[str, Any], str]) -> None:
        status, headers, reply = conn.exchange(serialise(*case))
        entry = check_answer(status, headers, reply)
        statuses[f"{status} {headers.get('x-velo-action', '')}".strip()] += 1
        if entry:
            promised.add(entry)

    started = time.monotonic()
    try:
        one_request()
    finally:
        print(f"\nfuzz: {sum(statuses.values())} requests in {time.monotonic() - started:.1f} s, "
              f"one connection; statuses: {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= EXAMPLES * 0.9
    assert statuses["200 B"] > EXAMPLES // 20 and sum(n for s, n in statuses.items() if s.startswith("4")) > EXAMPLES // 3

    # the same connection still serves, and the question asked before still gets its own answer
    again, headers = ask(conn, KNOWN)
    assert headers["x-velo-action"] == "exact" and again == known_answer
    conn.close()

    # the store holds exactly the answers the successful requests promised, nothing from failed ones
    stats = settle(proxy)
    assert stats["store"]["entries"] == len(promised)
    with admin(proxy) as client:
        for entry_id in promised:
            entry = client.get(f"/admin/entries/{entry_id}")
            assert entry.status_code == 200, entry_id
            assert "Answer to:" in entry.json()["answer"]["message"]["content"]
