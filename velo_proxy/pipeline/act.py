"""Act: the HTTP response of a choice. A cached answer (exact or A) as JSON or as an SSE replay;
B forwards upstream, C forwards with the cached Q&A as context (``augment``), either as one JSON body
or relayed chunk by chunk. An upstream answer is stored only when the upstream itself said it is
complete (``cacheable_answer``)."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi.responses import JSONResponse, Response, StreamingResponse

from velo_proxy.augment import augmented_payload
from velo_proxy.errors import ProxyError, error_event
from velo_proxy.metrics import Metrics
from velo_proxy.pipeline.after import AfterResponse
from velo_proxy.pipeline.context import RequestContext
from velo_proxy.protocol import completion_from_message
from velo_proxy.sse import DONE, StreamAssembler, replay, replay_chunks, sse
from velo_proxy.upstream import Upstream

log = logging.getLogger("velo_proxy.engine")


def cacheable_answer(message: dict[str, Any], *, finished: bool, usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """The answer record to cache, or None: only plain text the upstream said was complete (its own
    "stop"; for a stream, also its end marker) is cached, never tool calls or a cut-off answer."""
    content = message.get("content")
    if not finished or message.get("tool_calls") or not isinstance(content, str):
        return None
    return {"message": {"role": "assistant", "content": content}, "finish_reason": "stop", "usage": usage}


class Act:
    def __init__(self, *, upstream: Upstream, after: AfterResponse, metrics: Metrics, augment_max_tokens: int) -> None:
        self.upstream = upstream
        self.after = after
        self.metrics = metrics
        self.augment_max_tokens = augment_max_tokens

    def serve_cached(self, ctx: RequestContext) -> Response:
        """The cached answer of the choice (exact or A), as the client asked for it."""
        choice = ctx.trace.choice
        assert choice.answer is not None
        ctx.trace.entry = choice.entry
        completion_id = f"chatcmpl-velo-{uuid.uuid4().hex[:24]}"
        self.after.finished(ctx, completion_id)
        answer, model = choice.answer, ctx.chat.model
        if ctx.stream:
            chunks = replay_chunks(completion_id=completion_id, model=model, message=answer["message"],
                                   finish_reason=answer.get("finish_reason"), usage=answer.get("usage"),
                                   include_usage=ctx.include_usage)
            return StreamingResponse(replay(chunks), media_type="text/event-stream", headers=ctx.trace.headers())
        body = completion_from_message(completion_id=completion_id, model=model, message=answer["message"],
                                       finish_reason=answer.get("finish_reason"), usage=answer.get("usage"))
        return JSONResponse(body, headers=ctx.trace.headers())

    def augment(self, ctx: RequestContext) -> None:
        """C: the request goes upstream with the chosen cached Q&A inserted as context."""
        hit = ctx.trace.choice.hit
        assert hit is not None
        ctx.upstream_payload = augmented_payload(
            ctx.payload, question=hit.entry.question, answer=str(hit.entry.answer["message"].get("content") or ""),
            max_tokens=self.augment_max_tokens)

    async def forward(self, ctx: RequestContext) -> Response:
        return await (self._forward_stream(ctx) if ctx.stream else self._forward_json(ctx))

    async def _forward_json(self, ctx: RequestContext) -> Response:
        t0 = time.perf_counter()
        # finished: the upstream itself said "stop" (not litellm's normalised stand-in for nothing)
        data, finished = await self.upstream.complete_checked(ctx.upstream_payload, target=ctx.target,
                                                              client_key=ctx.caller.client_key)
        self.metrics.upstream_latency.observe(time.perf_counter() - t0)
        message = ((data.get("choices") or [{}])[0]).get("message") or {}
        answer = cacheable_answer(message, finished=finished, usage=data.get("usage"))
        ctx.trace.entry = self.after.store(ctx, answer) if answer is not None else None
        self.after.finished(ctx, data.get("id"))
        return JSONResponse(data, headers=ctx.trace.headers())

    async def _forward_stream(self, ctx: RequestContext) -> Response:
        t0 = time.perf_counter()
        chunks = await self.upstream.stream(ctx.upstream_payload, target=ctx.target, client_key=ctx.caller.client_key)
        ctx.trace.entry = ctx.new_entry  # the id the answer gets if the stream completes normally

        async def relay() -> AsyncIterator[bytes]:
            assembler = StreamAssembler()
            completion_id = None
            try:
                async for chunk in chunks:
                    completion_id = completion_id or chunk.get("id")
                    assembler.feed(chunk)
                    yield sse(chunk)
            except ProxyError as err:
                # headers are gone: tell the client in-band; the OpenAI SDKs raise on this event
                self.metrics.errors.labels(str(err.status)).inc()
                log.warning("upstream stream failed mid-way: %s", err.message)
                yield error_event(err)
                return
            if chunks.end_marker:  # relayed as the upstream ended it: no [DONE] it did not send
                yield DONE
            self.metrics.upstream_latency.observe(time.perf_counter() - t0)
            self.after.finished(ctx, completion_id)
            # only a stream the upstream itself said was complete ("stop" and its end marker) is cached
            answer = cacheable_answer(assembler.message(), finished=assembler.cacheable and chunks.finished,
                                      usage=assembler.usage)
            if answer is not None:
                self.after.store(ctx, answer)

        return StreamingResponse(relay(), media_type="text/event-stream", headers=ctx.trace.headers())
