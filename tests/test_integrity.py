"""Nothing wrong is ever stored: an answer is cached only when the upstream itself said it finished
(finish_reason "stop" in its own bytes, and for a stream the [DONE] marker too). Anything else is
relayed as the upstream sent it (no finish_reason litellm made up, no [DONE] the upstream did not
send) and forwarded again on a repeat. A real proxy, the fake upstream misbehaving on purpose
(velo_proxy/devtools/fake_upstream.py), the official openai SDK."""

from __future__ import annotations

import gzip
import json
import time

import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.test_cache import settle
from velo_proxy.upstream import RawTap

ADMIN = "admin-key-for-tests"


def sdk(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="client-key", max_retries=0)


def ask(server, model: str, question: str, *, stream: bool) -> tuple[str, list[str | None], str]:
    """(text, every finish_reason the client saw, x-velo-action) through the SDK."""
    raw = sdk(server).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": question}], stream=stream)
    if not stream:
        completion = raw.parse()
        return completion.choices[0].message.content, [completion.choices[0].finish_reason], raw.headers["x-velo-action"]
    chunks = [c for c in raw.parse() if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason is not None]
    return text, finishes, raw.headers["x-velo-action"]


def raw_sse(server, model: str, question: str) -> tuple[list[str], str]:
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=30, json={
            "model": model, "stream": True, "messages": [{"role": "user", "content": question}]}) as response:
        assert response.status_code == 200
        return [line for line in response.iter_lines() if line], response.headers["x-velo-action"]


@pytest.fixture()
def proxy(make_proxy, embedder_dir):
    return make_proxy(admin_key=ADMIN, similarity_threshold=0.9)


# model, stream, the finish_reasons the client must see, whether the stream ends with [DONE]
MISBEHAVING = [
    pytest.param("fake-truncated", True, [], False, id="stream-no-finish-no-done"),
    pytest.param("fake-no-done", True, ["stop"], False, id="stream-stop-but-no-done"),
    pytest.param("fake-no-finish", True, [], True, id="stream-done-but-no-finish"),
    pytest.param("fake-finish-absent", True, [], True, id="stream-done-finish-key-absent"),
    pytest.param("fake-no-finish", False, [None], None, id="json-finish-null"),
    pytest.param("fake-finish-absent", False, [None], None, id="json-finish-absent"),
    pytest.param("fake-length", False, ["length"], None, id="json-length"),
    pytest.param("fake-length", True, ["length"], True, id="stream-length"),
]


@pytest.mark.parametrize("model, stream, finishes, done", MISBEHAVING)
def test_unfinished_answers_are_relayed_as_sent_and_never_cached(proxy, upstream_requests, model, stream,
                                                                 finishes, done):
    question = f"How far is the Moon from the Earth, asked of {model}?"
    text, seen, action = ask(proxy, model, question, stream=stream)
    assert action == "B"
    assert text.endswith(f"Answer to: {question}")
    assert seen == finishes, "the client gets the upstream's finish_reason, not one made up"
    assert settle(proxy)["store"]["entries"] == 0

    # the repeat is forwarded again, never served from the cache (neither exact nor semantic)
    _, _, again = ask(proxy, model, question, stream=stream)
    assert again == "B"
    _, _, paraphrase = ask(proxy, model, question.replace("How far is", "What is the distance of"), stream=stream)
    assert paraphrase == "B"
    assert len(upstream_requests) == 3

    if stream:  # on the wire: no [DONE] that the upstream did not send, no invented "stop"
        lines, raw_action = raw_sse(proxy, model, question)
        assert raw_action == "B" and len(upstream_requests) == 4
        assert (lines[-1] == "data: [DONE]") is done
        reasons = [c["finish_reason"] for line in lines if line != "data: [DONE]"
                   for c in json.loads(line[6:])["choices"] if c.get("finish_reason") is not None]
        assert reasons == finishes
    assert settle(proxy)["store"]["entries"] == 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_finished_answers_are_still_cached(proxy, upstream_requests, stream):
    """The control: an upstream that says "stop" (and [DONE]) is cached and replayed as it said."""
    question = "Why is the sky blue during the day?"
    text, seen, action = ask(proxy, "fake-model", question, stream=stream)
    assert action == "B" and seen == ["stop"]
    assert settle(proxy)["store"]["entries"] == 1
    cached_text, cached_seen, cached_action = ask(proxy, "fake-model", question, stream=stream)
    assert cached_action == "exact" and cached_text == text and cached_seen == ["stop"]
    lines, _ = raw_sse(proxy, "fake-model", question)
    assert lines[-1] == "data: [DONE]"
    assert len(upstream_requests) == 1


def test_hosted_vllm_targets_are_checked_too(make_proxy, embedder_dir, upstream_requests):
    """The model map's other OpenAI-compatible provider goes through litellm's own HTTP handler;
    the proxy reads its bytes the same way."""
    proxy = make_proxy(admin_key=ADMIN, similarity_threshold=0.9,
                       model_map={"ok": "hosted_vllm/fake-model", "cut": "hosted_vllm/fake-truncated"})
    questions = {False: "Why do volcanoes erupt?", True: "How do rivers form their valleys?"}
    for stream, question in questions.items():
        for model in ("ok", "cut"):
            ask(proxy, model, question, stream=stream)
    assert settle(proxy)["store"]["entries"] == 2  # the two "ok" answers only
    _, seen, action = ask(proxy, "cut", questions[True], stream=True)
    assert action == "B" and seen == []
    _, seen, action = ask(proxy, "cut", questions[False], stream=False)
    assert action == "B" and seen == [None]
    _, _, action = ask(proxy, "ok", questions[True], stream=True)
    assert action == "exact"
    assert [r["body"]["model"] for r in upstream_requests].count("fake-truncated") == 4


def test_raw_tap_reads_split_and_compressed_bodies():
    events = (b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": null}]}\r\n\r\n'
              b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n')
    tap = RawTap()
    tap.response(httpx.Headers({"content-type": "text/event-stream", "content-encoding": "gzip"}))
    packed = gzip.compress(events)
    for i in range(0, len(packed), 7):  # split mid-line and mid-gzip-block
        tap.feed(packed[i:i + 7])
    assert tap.finish_reasons() == {0: "stop"} and tap.done

    tap.response(httpx.Headers({"content-type": "application/json"}))
    tap.feed(b'{"choices": [{"index": 0, "message": {}}]}')
    assert tap.finish_reasons() == {0: None} and not tap.done

    tap.response(httpx.Headers({"content-type": "application/json", "content-encoding": "br"}))
    tap.feed(b"\x00\x01")
    assert tap.finish_reasons() is None  # unreadable: never taken as "finished"


def test_raw_tap_reads_the_anthropic_wire_format():
    events = (b'event: message_start\ndata: {"type": "message_start", "message": {"stop_reason": null}}\n\n'
              b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, '
              b'"delta": {"type": "text_delta", "text": "hi"}}\n\n'
              b'event: message_delta\ndata: {"type": "message_delta", "delta": {"stop_reason": "end_turn"}}\n\n'
              b'event: message_stop\ndata: {"type": "message_stop"}\n\n')
    tap = RawTap("anthropic")
    tap.response(httpx.Headers({"content-type": "text/event-stream"}))
    for i in range(0, len(events), 5):
        tap.feed(events[i:i + 5])
        if i + 5 < len(events) - 40:
            assert not tap.done  # complete only with message_stop
    assert tap.finish_reasons() == {0: "stop"} and tap.done

    for raw, said in (("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
                      ("tool_use", "tool_calls"), ("pause_turn", "pause_turn"), (None, None)):
        tap.response(httpx.Headers({"content-type": "application/json"}))
        tap.feed(json.dumps({"type": "message", "content": [], "stop_reason": raw}).encode())
        assert tap.finish_reasons() == {0: said}, raw
    tap.response(httpx.Headers({"content-type": "application/json"}))
    tap.feed(b'{"type": "error", "error": {"type": "overloaded_error"}}')
    assert tap.finish_reasons() == {}


# Anthropic targets: the fake upstream's /v1/messages, model -> (finish_reasons the client sees as JSON,
# as a stream, whether the stream ends with [DONE], whether the answer is cached (JSON, stream))
ANTHROPIC = {
    "fake-model": (["stop"], ["stop"], True, (True, True)),
    "fake-length": (["length"], ["length"], True, (False, False)),
    "fake-pause": (["pause_turn"], ["pause_turn"], True, (False, False)),  # litellm alone: "stop"
    "fake-no-finish": ([None], [], True, (False, False)),  # litellm alone: "stop"
    "fake-no-done": (["stop"], ["stop"], False, (True, False)),  # stop reason, but no message_stop
    "fake-truncated": ([None], [], False, (False, False)),
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_anthropic_targets_are_judged_by_their_own_stop_reason(make_proxy, embedder_dir, fake_upstream,
                                                               upstream_requests, monkeypatch, stream):
    """An ``anthropic/...`` target is read through the same tapped client: its answer is cached only
    when the Messages API itself said ``end_turn`` (for a stream, also its closing ``message_stop``),
    not because litellm reports "stop" for a stop reason it does not know or for none at all."""
    monkeypatch.setenv("ANTHROPIC_API_BASE", fake_upstream.url)  # litellm's base for anthropic/ targets
    proxy = make_proxy(admin_key=ADMIN, similarity_threshold=0.9,
                       model_map={model: f"anthropic/{model}" for model in ANTHROPIC})
    question = {model: f"How deep is the ocean, asked of {model} as {'a stream' if stream else 'JSON'}?"
                for model in ANTHROPIC}
    for model, (json_finishes, stream_finishes, _, _) in ANTHROPIC.items():
        text, seen, action = ask(proxy, model, question[model], stream=stream)
        assert action == "B" and text.endswith(f"Answer to: {question[model]}"), model
        assert seen == (stream_finishes if stream else json_finishes), model
    assert all(r["headers"]["x-api-key"] == UPSTREAM_KEY for r in upstream_requests)
    assert {r["body"]["model"] for r in upstream_requests} == set(ANTHROPIC)
    cached = [model for model, spec in ANTHROPIC.items() if spec[3][stream]]
    assert settle(proxy)["store"]["entries"] == len(cached)
    for model, (_, _, done, _) in ANTHROPIC.items():  # only what the upstream said was complete comes back
        if stream:  # on the wire: [DONE] only where the upstream sent message_stop
            lines, again = raw_sse(proxy, model, question[model])
            assert (lines[-1] == "data: [DONE]") is (done or model in cached), model
        else:
            _, _, again = ask(proxy, model, question[model], stream=stream)
        assert again == ("exact" if model in cached else "B"), model


@pytest.mark.parametrize("target", ["openai/fake-model", "hosted_vllm/fake-model"])
def test_client_fields_never_become_litellm_arguments(make_proxy, embedder_dir, upstream_requests, target):
    """Fields litellm reads as its own arguments are relayed to the upstream as plain unknown fields:
    a body cannot make litellm invent the answer (which was then cached), send the upstream key
    elsewhere, or add headers."""
    proxy = make_proxy(admin_key=ADMIN, similarity_threshold=0.9, model_map={"m": target})
    steering = {"mock_response": "POISONED", "base_url": "http://127.0.0.1:9/v1", "api_base": "http://127.0.0.1:9/v1",
                "api_key": "client-chosen", "extra_headers": {"x-injected": "1"}, "custom_llm_provider": "anthropic"}
    question = "What is the boiling point of water at sea level?"
    completion = sdk(proxy).chat.completions.create(model="m", messages=[{"role": "user", "content": question}],
                                                    extra_body=steering)
    assert completion.choices[0].message.content.endswith(f"Answer to: {question}")
    sent = upstream_requests[-1]
    assert {k: sent["body"][k] for k in steering} == steering  # relayed verbatim, as any vendor field
    assert sent["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}" and "x-injected" not in sent["headers"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_providers_whose_bytes_are_not_read_are_not_cached_unless_trusted(make_proxy, embedder_dir, fake_upstream,
                                                                           upstream_requests, monkeypatch, stream):
    """A provider outside openai/hosted_vllm/anthropic goes through litellm's own client, so the proxy
    cannot see whether the upstream said the answer finished (litellm reports "stop" either way). Its
    answers are relayed but not cached, unless the operator lists it in VELO_TRUSTED_FINISH_PROVIDERS."""
    monkeypatch.setenv("DEEPSEEK_API_BASE", f"{fake_upstream.url}/v1")  # litellm's base for deepseek/ targets
    question = f"How far away is the Moon, asked as {'a stream' if stream else 'JSON'}?"
    strict = make_proxy(admin_key=ADMIN, similarity_threshold=0.9, model_map={"m": "deepseek/fake-model"})
    for _ in range(2):
        text, seen, action = ask(strict, "m", question, stream=stream)
        assert action == "B" and text.endswith(f"Answer to: {question}") and seen == ["stop"]
    assert len(upstream_requests) == 2 and upstream_requests[-1]["body"]["model"] == "fake-model"
    assert settle(strict)["store"]["entries"] == 0

    trusting = make_proxy(admin_key=ADMIN, similarity_threshold=0.9, model_map={"m": "deepseek/fake-model"},
                          trusted_finish_providers=["deepseek"])
    assert ask(trusting, "m", question, stream=stream)[2] == "B"
    assert settle(trusting)["store"]["entries"] == 1
    text, _, action = ask(trusting, "m", question, stream=stream)
    assert action == "exact" and text.endswith(f"Answer to: {question}")
    assert len(upstream_requests) == 3


def test_trusted_finish_providers_setting_parses_a_comma_list(monkeypatch):
    from velo_proxy.settings import Settings

    monkeypatch.setenv("VELO_TRUSTED_FINISH_PROVIDERS", "gemini, bedrock")
    assert Settings().trusted_finish_providers == ["gemini", "bedrock"]
