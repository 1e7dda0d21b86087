"""A small OpenAI-compatible chat server for tests, benchmarks and trying the proxy without an LLM.

Every answer is numbered (``[n]``) so a caller can tell a fresh upstream answer from a cached one.
Behaviour is chosen by the model name:

    fake-error-<status>   answers that HTTP status with an OpenAI error body
    fake-html-502         answers 502 with an HTML page (a broken gateway in front of the LLM)
    fake-slow-<ms>        waits <ms> milliseconds before answering
    fake-drop             streams two chunks, then breaks the connection
    fake-tools            answers with a tool call
    fake-length           answers with finish_reason "length"
    fake-no-finish        never says it finished: finish_reason null (streams: no finish chunk), [DONE] sent
    fake-finish-absent    leaves the finish_reason key out of every choice, [DONE] sent
    fake-no-done          finish_reason "stop", but the stream ends without [DONE]
    fake-truncated        no finish_reason and (streams) no [DONE]: the body just ends cleanly
    fake-random           answers with an unrelated sentence (a cached answer that a fresh one contradicts)
    fake-meaning          answers by meaning: ``app.state.meanings`` maps a question to its answer text (every
                          question of one paraphrase cluster to that cluster's answer), prefixed "[n] "
    fake-judge            an LLM judge: to the proxy's judge prompt (velo_proxy.judging) it says "yes" when the
                          candidate answer is the meaning's answer of the question, else "no"
    anything else         answers normally, after the server's base latency

``POST /v1/messages`` speaks Anthropic's Messages API (``x-api-key`` auth; stop reason ``end_turn``, and
for streams the ``message_delta`` / ``message_stop`` events), for ``anthropic/<model>`` targets:

    fake-length           stop_reason "max_tokens"
    fake-pause            stop_reason "pause_turn" (litellm, not knowing it, reports "stop")
    fake-no-finish        stop_reason null (streams: no stop reason in message_delta), message_stop sent
    fake-no-done          stop_reason "end_turn", but the stream ends without message_stop
    fake-truncated        no stop reason and (streams) no message_stop: the body just ends cleanly
    anything else         stop_reason "end_turn"

Run it: ``python -m velo_proxy.devtools.fake_upstream --port 8001 --latency-ms 500``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse


_UNRELATED = (
    "Bananas are berries, botanically speaking, while strawberries are not.",
    "The stock market closed lower after a volatile trading session on Friday.",
    "To reset the router, hold the power button for thirty seconds.",
    "Mount Kilimanjaro is the highest mountain in Africa.",
)


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
            return str(content)
    return ""


def _judge(prompt: str, meanings: dict[str, str]) -> str:
    """Reads velo_proxy.judging.judge_prompt: "Question:\n<q>\n\nCandidate answer:\n<a>\n\n..."."""
    try:
        question = prompt.split("Question:\n", 1)[1].split("\n\nCandidate answer:\n", 1)[0]
        answer = prompt.split("\n\nCandidate answer:\n", 1)[1].rsplit("\n\n", 1)[0]
    except IndexError:
        return "I cannot tell."
    right = meanings.get(question)
    return "yes" if right is not None and answer.split("] ", 1)[-1] == right else "no"


def create_fake_upstream(*, latency_ms: float = 0.0, api_key: str | None = None, chunk_delay_ms: float = 0.0) -> FastAPI:
    """``api_key`` set: requests without ``Authorization: Bearer <api_key>`` get 401."""
    app = FastAPI()
    counter = itertools.count(1)
    app.state.requests = []  # {"headers", "body"} of every chat request, for assertions
    app.state.latency_ms = latency_ms
    app.state.meanings = {}  # question -> answer text, for fake-meaning and fake-judge

    def _check_key(request: Request) -> Response | None:
        if api_key is None:
            return None
        if request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                           "param": None, "code": "invalid_api_key"}}, status_code=401)
        return None

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return _check_key(request) or JSONResponse({"object": "list", "data": [
            {"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}]})

    @app.get("/_requests")
    async def recorded() -> list[Any]:
        return list(app.state.requests)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        denied = _check_key(request)
        if denied:
            return denied
        body = await request.json()
        app.state.requests.append({"headers": dict(request.headers), "body": body})
        model = str(body.get("model", ""))
        if model.startswith("fake-error-"):
            status = int(model.rsplit("-", 1)[1])
            return JSONResponse({"error": {"message": f"fake upstream error {status}", "type": "fake_error",
                                           "param": "model", "code": f"fake_{status}"}}, status_code=status)
        if model == "fake-html-502":
            return HTMLResponse("<html><body>502 Bad Gateway</body></html>", status_code=502)
        delay = app.state.latency_ms
        if model.startswith("fake-slow-"):
            delay = float(model.rsplit("-", 1)[1])
        if delay:
            await asyncio.sleep(delay / 1000)
        n = next(counter)
        text = f"[{n}] Answer to: {_last_user_text(body)}"
        if model == "fake-random":
            text = _UNRELATED[n % len(_UNRELATED)]
        if model == "fake-meaning":
            question = _last_user_text(body)
            text = f"[{n}] " + app.state.meanings.get(question, f"Nobody knows about: {question}")
        if model == "fake-judge":
            text = _judge(_last_user_text(body), app.state.meanings)
        finish: str | None = "length" if model == "fake-length" else "stop"
        if model in ("fake-no-finish", "fake-truncated"):
            finish = None
        omit_finish = model == "fake-finish-absent"  # the key itself is missing, not null
        send_done = model not in ("fake-no-done", "fake-truncated")
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if model == "fake-tools":
            message = {"role": "assistant", "content": None, "tool_calls": [{
                "id": f"call_{n}", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}
            finish = "tool_calls"
        usage = {"prompt_tokens": 10, "completion_tokens": len(text.split()), "total_tokens": 10 + len(text.split())}
        cid, created = f"chatcmpl-fake-{n}", int(time.time())
        if not body.get("stream"):
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            if omit_finish:
                del choice["finish_reason"]
            return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model,
                                 "choices": [choice], "usage": usage})

        def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> str:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            if omit_finish:
                del choice["finish_reason"]
            data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [choice], **extra}
            return "data: " + json.dumps(data) + "\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            words = text.split(" ")
            for i, word in enumerate(words):
                if model == "fake-drop" and i == 2:
                    raise ConnectionResetError("fake upstream dropped the stream")
                yield chunk({"content": word if i == 0 else " " + word})
                if chunk_delay_ms:
                    await asyncio.sleep(chunk_delay_ms / 1000)
            if finish is not None:
                yield chunk({}, finish)
            if (body.get("stream_options") or {}).get("include_usage"):
                yield "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                             "model": model, "choices": [], "usage": usage}) + "\n\n"
            if send_done:
                yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        if api_key is not None and request.headers.get("x-api-key") != api_key:
            return JSONResponse({"type": "error", "error": {"type": "authentication_error",
                                                            "message": "invalid x-api-key"}}, status_code=401)
        body = await request.json()
        app.state.requests.append({"headers": dict(request.headers), "body": body})
        model = str(body.get("model", ""))
        n = next(counter)
        text = f"[{n}] Answer to: {_last_user_text(body)}"
        stop_reason = {"fake-length": "max_tokens", "fake-pause": "pause_turn", "fake-no-finish": None,
                       "fake-truncated": None}.get(model, "end_turn")
        send_stop = model not in ("fake-no-done", "fake-truncated")
        usage = {"input_tokens": 10, "output_tokens": len(text.split())}
        mid = f"msg_fake_{n}"
        if not body.get("stream"):
            return JSONResponse({"id": mid, "type": "message", "role": "assistant", "model": model,
                                 "content": [{"type": "text", "text": text}], "stop_reason": stop_reason,
                                 "stop_sequence": None, "usage": usage})

        def event(kind: str, **data: Any) -> str:
            return f"event: {kind}\ndata: " + json.dumps({"type": kind, **data}) + "\n\n"

        async def events():
            yield event("message_start", message={"id": mid, "type": "message", "role": "assistant", "model": model,
                                                  "content": [], "stop_reason": None, "stop_sequence": None,
                                                  "usage": {"input_tokens": 10, "output_tokens": 1}})
            yield event("content_block_start", index=0, content_block={"type": "text", "text": ""})
            for i, word in enumerate(text.split(" ")):
                yield event("content_block_delta", index=0,
                            delta={"type": "text_delta", "text": word if i == 0 else " " + word})
            yield event("content_block_stop", index=0)
            if model != "fake-truncated":
                yield event("message_delta", delta={"stop_reason": stop_reason, "stop_sequence": None},
                            usage={"output_tokens": usage["output_tokens"]})
            if send_stop:
                yield event("message_stop")

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    uvicorn.run(create_fake_upstream(latency_ms=args.latency_ms), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
