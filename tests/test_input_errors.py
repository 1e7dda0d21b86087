"""Every input gets an answer in the OpenAI error envelope with a 4xx naming the field, never a 500
or a 502 that is really the client's fault, and the keep-alive connection it came on stays usable.
Raw bytes over a real socket to a real proxy (cache on: the exact key hashes the body) in front of
the fake upstream."""

from __future__ import annotations

import json

import pytest
from fastapi.responses import StreamingResponse

from tests.conftest import UPSTREAM_KEY
from tests.rawhttp import Connection
from velo_proxy.app import create_app
from velo_proxy.devtools.server import ServerThread
from velo_proxy.settings import Settings

VALID = {"model": "fake-model", "messages": [{"role": "user", "content": "Is this connection still alive?"}]}
BODY_TIMEOUT_S = 1.0


def assert_envelope(status: int, headers: dict[str, str], body: bytes, expected: int, param: str | None) -> dict:
    assert status == expected, body
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("server_error" if expected >= 500 else "invalid_request_error")
    assert error["param"] == param
    return error


def assert_still_serves(conn: Connection) -> None:
    status, headers, body = conn.exchange(json.dumps(VALID).encode())
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"].endswith("Is this connection still alive?")
    assert headers.get("connection", "").lower() != "close"


@pytest.fixture(scope="module")
def proxy(fake_upstream, tmp_path_factory, embedder_dir) -> ServerThread:
    app = create_app(Settings(upstream_base_url=f"{fake_upstream.url}/v1", upstream_api_key=UPSTREAM_KEY,
                              data_dir=tmp_path_factory.mktemp("data"), policy="threshold", shadow_rate=0.0,
                              body_read_timeout_s=BODY_TIMEOUT_S))

    # Two routes with bugs of ours, to prove that no unexpected exception ever leaves without the envelope.
    @app.get("/test-only/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    @app.get("/test-only/boom-stream")
    async def boom_stream() -> StreamingResponse:
        async def events():
            yield b'data: {"choices": []}\n\n'
            raise RuntimeError("a bug mid-stream")
        return StreamingResponse(events(), media_type="text/event-stream")

    server = ServerThread(app).start()
    yield server
    server.stop()


@pytest.fixture()
def conn(proxy) -> Connection:
    connection = Connection(proxy)
    yield connection
    connection.close()


def body(**fields) -> bytes:
    return json.dumps({**VALID, **fields}).encode()


DEEP = b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "foo": ' + b"[" * 1000 + b"]" * 1000 + b"}"
USER_X = b'"messages": [{"role": "user", "content": "x"}]'

CASES = [
    # a lone UTF-16 surrogate in each kind of hashed field, and in a field name
    pytest.param(b'{"model": "fake-model", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
                 "messages.0.content", id="surrogate-question"),
    pytest.param(b'{"model": "fake-model", "messages": [{"role": "system", "content": "\\udfff"}, '
                 b'{"role": "user", "content": "x"}]}', "messages.0.content", id="surrogate-context"),
    pytest.param(b'{"model": "fake-\\ud800", ' + USER_X + b"}", "model", id="surrogate-model"),
    pytest.param(b'{"model": "fake-model", ' + USER_X + b', "stop": ["\\ud800"]}', "stop.0", id="surrogate-param"),
    pytest.param(b'{"model": "fake-model", ' + USER_X + b', "vendor": {"a": "\\ud800"}}', "vendor.a",
                 id="surrogate-unknown-field"),
    pytest.param(b'{"model": "fake-model", ' + USER_X + b', "\\ud800": 1}', "body", id="surrogate-field-name"),
    pytest.param(b'{"model": "fake-model", "messages": [{"role": "user", "content": [{"type": "text", '
                 b'"text": "\\ud800"}]}]}', "messages.0.content.0.text", id="surrogate-text-part"),
    # nesting
    pytest.param(DEEP, None, id="nested-1000-deep"),
    pytest.param(body(foo=json.loads("[" * 150 + "]" * 150)), "foo", id="nested-150-deep"),
    # what litellm chokes on (was a 502)
    pytest.param(body(metadata=["a", "b"]), "metadata", id="metadata-list"),
    pytest.param(body(metadata="tags"), "metadata", id="metadata-string"),
    pytest.param(body(messages=[{"role": "developer", "content": None}, {"role": "user", "content": "x"}]),
                 "messages.0.content", id="developer-null-content"),
    pytest.param(body(messages=[{"role": "user", "content": None}]), "messages.0.content", id="user-null-content"),
    pytest.param(b'{"model": "fake-model", ' + USER_X + b', "vendor": NaN}', "vendor", id="nan-unknown-field"),
    pytest.param(b'{"model": "fake-model", ' + USER_X + b', "vendor": [Infinity]}', "vendor.0", id="infinity"),
    pytest.param(b'{"model": "fake-model", ' + USER_X + b', "vendor": -1e999}', "vendor", id="overflow-to-inf"),
    pytest.param(body(messages=[{"role": "user", "content": [{"type": "text", "text": 42}]}]),
                 "messages.0.content.0.text", id="text-part-number"),
    pytest.param(body(messages=[{"role": "user", "content": [{"text": "no type"}]}]),
                 "messages.0.content.0.type", id="part-without-type"),
]


@pytest.mark.parametrize("raw, param", CASES)
def test_bad_input_gets_400_in_the_envelope_and_the_connection_lives_on(conn, raw, param):
    assert_still_serves(conn)  # the connection is pooled: it served before
    status, headers, reply = conn.exchange(raw)
    assert_envelope(status, headers, reply, 400, param)
    assert headers.get("connection", "").lower() != "close"
    assert_still_serves(conn)


def test_feedback_with_a_surrogate_gets_400(conn):
    status, headers, reply = conn.exchange(b'{"id": "chatcmpl-\\ud800", "score": 1}', path="/v1/feedback")
    assert_envelope(status, headers, reply, 400, "id")
    assert_still_serves(conn)


def test_body_shorter_than_its_content_length_gets_408_and_the_connection_closes(proxy, conn):
    assert_still_serves(conn)
    partial = json.dumps(VALID).encode()[:20]
    conn.send(partial, content_length=len(partial) + 100)
    status, headers, reply = conn.response()  # answered within the deadline instead of hanging
    assert_envelope(status, headers, reply, 408, None)
    # the rest of the body may still come: the framing is lost, so the proxy says so and closes
    assert headers["connection"].lower() == "close"
    with pytest.raises(ConnectionError):
        conn._read()
    fresh = Connection(proxy)
    try:
        assert_still_serves(fresh)
    finally:
        fresh.close()


def test_an_unexpected_exception_is_a_500_envelope_on_a_living_connection(proxy, conn):
    for _ in range(2):
        status, headers, reply = conn.exchange(b"", method="GET", path="/test-only/boom")
        error = assert_envelope(status, headers, reply, 500, None)
        assert error["message"] == "Internal proxy error." and "a bug" not in reply.decode()
        assert headers["x-request-id"]
        assert_still_serves(conn)


def test_an_exception_mid_stream_ends_the_stream_with_an_error_event(conn):
    status, headers, reply = conn.exchange(b"", method="GET", path="/test-only/boom-stream")
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [json.loads(e[6:]) for e in reply.decode().split("\n\n") if e.startswith("data: ")]
    assert events[-1]["error"]["type"] == "server_error"
    assert_still_serves(conn)
