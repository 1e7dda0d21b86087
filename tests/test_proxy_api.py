"""The proxy as a plain OpenAI-compatible pass-through (cache off): SDK sync/async/streaming,
pass-through of unknown fields, auth, request ids, health, metrics, and every error path."""

from __future__ import annotations

import json
import logging
import socket

import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY


@pytest.fixture()
def proxy(make_proxy):
    return make_proxy(cache_enabled=False)


def client(server, key: str = "anything", **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, **kwargs)


def test_sync_completion_and_passthrough_of_unknown_fields(proxy, upstream_requests):
    raw = client(proxy).chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": "hello"}], temperature=0.2,
        extra_body={"top_k": 7, "vendor_option": {"a": 1}})
    completion = raw.parse()
    assert completion.choices[0].message.content.endswith("Answer to: hello")
    assert completion.model == "fake-model"
    assert raw.headers["x-velo-action"] == "B"
    body = upstream_requests[-1]["body"]
    assert body["top_k"] == 7 and body["vendor_option"] == {"a": 1} and body["temperature"] == 0.2
    assert upstream_requests[-1]["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"


async def test_async_completion(proxy):
    async with openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0) as aclient:
        completion = await aclient.chat.completions.create(
            model="fake-model", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi async"}])
    assert completion.choices[0].message.content.endswith("Answer to: hi async")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.total_tokens > 0


def test_streaming_relays_chunks_and_usage(proxy):
    stream = client(proxy).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "stream me please"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.endswith("Answer to: stream me please")
    assert len([c for c in chunks if c.choices]) >= 4  # relayed chunk by chunk, not re-assembled
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)


def test_streaming_without_usage_has_no_usage_chunk(proxy):
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", json={
            "model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "raw sse"}]}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    assert not any(p.get("usage") for p in payloads)


async def test_async_streaming(proxy):
    async with openai.AsyncOpenAI(base_url=f"{proxy.url}/v1", api_key="x", max_retries=0) as aclient:
        stream = await aclient.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "async stream"}], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.endswith("Answer to: async stream")


def test_tool_calls_pass_through(proxy, upstream_requests):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}]
    completion = client(proxy).chat.completions.create(
        model="fake-tools", messages=[{"role": "user", "content": "use the tool"}], tools=tools, tool_choice="auto")
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup" and completion.choices[0].finish_reason == "tool_calls"
    assert upstream_requests[-1]["body"]["tools"] == tools


def test_request_id_echoed_or_generated(proxy):
    given = httpx.get(f"{proxy.url}/healthz", headers={"x-request-id": "my-trace-42"})
    assert given.headers["x-request-id"] == "my-trace-42"
    fresh = httpx.post(f"{proxy.url}/v1/chat/completions", content=b"{")
    assert fresh.headers["x-request-id"].startswith("req-")
    bogus = httpx.get(f"{proxy.url}/healthz", headers={"x-request-id": "bad id\twith spaces"})
    assert bogus.headers["x-request-id"].startswith("req-")


def test_health_ready_metrics(proxy):
    assert httpx.get(f"{proxy.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{proxy.url}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    client(proxy).chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "count me"}])
    metrics = httpx.get(f"{proxy.url}/metrics").text
    assert 'velo_requests_total{action="B"}' in metrics
    assert "velo_upstream_seconds_bucket" in metrics


def test_models_relayed_from_upstream(proxy):
    models = client(proxy).models.list()
    assert [m.id for m in models.data] == ["fake-model"]


def test_model_map_lists_and_rejects_unknown(make_proxy, upstream_requests):
    proxy = make_proxy(cache_enabled=False, model_map={"qwen": "openai/fake-model"})
    assert [m.id for m in client(proxy).models.list().data] == ["qwen"]
    completion = client(proxy).chat.completions.create(model="qwen", messages=[{"role": "user", "content": "mapped"}])
    assert completion.model == "qwen"
    assert upstream_requests[-1]["body"]["model"] == "fake-model"
    with pytest.raises(openai.NotFoundError) as err:
        client(proxy).chat.completions.create(model="gpt-unknown", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


def test_proxy_api_keys(make_proxy, upstream_requests):
    proxy = make_proxy(cache_enabled=False, api_keys="key-one,key-two")
    for key in ("", "wrong-key"):
        response = httpx.post(f"{proxy.url}/v1/chat/completions",
                              headers={"authorization": f"Bearer {key}"} if key else {},
                              json={"model": "fake-model", "messages": [{"role": "user", "content": "x"}]})
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert upstream_requests == []
    completion = client(proxy, key="key-two").chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "authorised"}])
    assert completion.choices[0].message.content.endswith("authorised")
    # the proxy's key is not forwarded: the upstream gets its own key
    assert upstream_requests[-1]["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_client_key_passes_through_without_upstream_key(make_proxy, upstream_requests):
    proxy = make_proxy(cache_enabled=False, upstream_api_key=None)
    ok = client(proxy, key=UPSTREAM_KEY).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "my own key"}])
    assert ok.choices[0].message.content.endswith("my own key")
    with pytest.raises(openai.AuthenticationError):
        client(proxy, key="not-the-key").chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "x"}])


def test_upstream_key_never_leaks(proxy, caplog):
    caplog.set_level(logging.DEBUG)
    responses = [
        httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "fake-model", "messages": [{"role": "user", "content": "a"}]}),
        httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "fake-error-401", "messages": [{"role": "user", "content": "a"}]}),
        httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "fake-html-502", "messages": [{"role": "user", "content": "a"}]}),
        httpx.get(f"{proxy.url}/readyz"),
        httpx.get(f"{proxy.url}/metrics"),
    ]
    for response in responses:
        assert UPSTREAM_KEY not in response.text
        assert UPSTREAM_KEY not in str(response.headers)
    assert UPSTREAM_KEY not in caplog.text


# ----- errors -------------------------------------------------------------------------------------

def _post(server, body: bytes | dict, **kwargs) -> httpx.Response:
    if isinstance(body, dict):
        return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30, **kwargs)
    return httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=30,
                      headers={"content-type": "application/json"}, **kwargs)


def _assert_envelope(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"model": "fake-model"}, "messages"),
    ({"model": "fake-model", "messages": []}, "messages"),
    ({"model": "fake-model", "messages": "hello"}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
    ({"model": "fake-model", "messages": [{"content": "no role"}]}, "messages.0.role"),
])
def test_bad_requests_get_400_with_the_field_named(proxy, upstream_requests, body, param):
    error = _assert_envelope(_post(proxy, body), 400, param)
    assert error["type"] == "invalid_request_error"
    assert upstream_requests == []


def test_oversized_body_413(make_proxy, upstream_requests):
    proxy = make_proxy(cache_enabled=False, max_body_bytes=2048)
    big = {"model": "fake-model", "messages": [{"role": "user", "content": "x" * 5000}]}
    _assert_envelope(_post(proxy, big), 413)

    def chunked():  # no content-length: the limit is enforced while reading
        yield b'{"model": "fake-model", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    _assert_envelope(httpx.post(f"{proxy.url}/v1/chat/completions", content=chunked(),
                                headers={"content-type": "application/json"}), 413)
    assert upstream_requests == []


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422, 429])
def test_upstream_4xx_relayed(proxy, status):
    error = _assert_envelope(_post(proxy, {"model": f"fake-error-{status}", "messages": [{"role": "user", "content": "x"}]}), status)
    assert error["message"] == f"fake upstream error {status}"


@pytest.mark.parametrize("model", ["fake-error-500", "fake-error-503", "fake-html-502"])
def test_upstream_5xx_and_html_become_502(proxy, model):
    error = _assert_envelope(_post(proxy, {"model": model, "messages": [{"role": "user", "content": "x"}]}), 502)
    assert "<html" not in json.dumps(error).lower() or error["type"] == "upstream_error"


def test_upstream_unreachable_502(make_proxy):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    proxy = make_proxy(cache_enabled=False, upstream_base_url=f"http://127.0.0.1:{dead}/v1")
    error = _assert_envelope(_post(proxy, {"model": "m", "messages": [{"role": "user", "content": "x"}]}), 502)
    assert error["code"] == "upstream_unreachable"
    with pytest.raises(openai.InternalServerError):
        client(proxy).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
    _assert_envelope(httpx.get(f"{proxy.url}/v1/models"), 502)


def test_upstream_timeout_504(make_proxy):
    proxy = make_proxy(cache_enabled=False, upstream_timeout_s=0.5)
    error = _assert_envelope(_post(proxy, {"model": "fake-slow-3000", "messages": [{"role": "user", "content": "x"}]}), 504)
    assert error["code"] == "upstream_timeout"


def test_stream_dropped_midway_raises_in_client(proxy):
    stream = client(proxy, timeout=20).chat.completions.create(
        model="fake-drop", messages=[{"role": "user", "content": "one two three four five"}], stream=True)
    received = []
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            received.append(chunk)
    assert received, "the chunks before the drop were relayed"
    assert "broke off" in err.value.message


def test_unknown_route_and_method_use_the_envelope(proxy):
    _assert_envelope(httpx.get(f"{proxy.url}/v2/nothing"), 404)
    _assert_envelope(httpx.get(f"{proxy.url}/v1/chat/completions"), 405)


def test_errors_are_counted_in_metrics(proxy):
    _post(proxy, b"{oops")
    assert 'velo_errors_total{status="400"}' in httpx.get(f"{proxy.url}/metrics").text


def test_start_up_objects_are_frozen_out_of_the_gc_while_the_app_runs(make_proxy):
    """VELO_GC_FREEZE (default on): what start-up built is moved out of the collector's reach, so a full
    collection under load no longer scans it (docs/benchmarks.md, speed); shutdown gives it back."""
    import gc

    server = make_proxy(cache_enabled=False)
    assert gc.get_freeze_count() > 10_000  # litellm, pydantic, the app: far more than a handful
    server.stop()
    assert gc.get_freeze_count() == 0


def test_a_stopped_app_lets_go_of_its_models(make_proxy):
    """FastAPI keeps every endpoint function, and through it the app, in module-level caches; shutdown drops
    what the lifespan built, so the models of a stopped app are freed (many apps share a test process, and
    the suite ran out of memory before: ~500 MB resident per stopped proxy with the multilingual verifier)."""
    import gc
    import weakref

    from velo_proxy.state import find_state

    server = make_proxy(policy="verified")
    assert httpx.get(f"{server.url}/readyz").json()["checks"]["verifier"]["ok"]
    services = weakref.ref(find_state(server.app).services)
    verifier = weakref.ref(find_state(server.app).services.verifier)
    server.stop()
    gc.collect()
    assert find_state(server.app) is None
    assert services() is None and verifier() is None
