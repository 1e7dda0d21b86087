"""Server-sent events in the OpenAI streaming format."""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator

DONE = b"data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _chunk(completion_id: str, model: str, created: int, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, **extra}


def replay_chunks(*, completion_id: str, model: str, message: dict[str, Any], finish_reason: str | None,
                  usage: dict[str, Any] | None, include_usage: bool, piece_chars: int = 64) -> list[dict[str, Any]]:
    """A cached answer as the chunk sequence an upstream would have streamed: role, content pieces,
    finish reason, and the usage chunk when the client asked for it."""
    created = int(time.time())
    content = message.get("content") or ""
    chunks = [_chunk(completion_id, model, created, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                      "finish_reason": None}])]
    for start in range(0, len(content), piece_chars):
        chunks.append(_chunk(completion_id, model, created, [{"index": 0, "delta": {"content": content[start:start + piece_chars]},
                                                              "finish_reason": None}]))
    chunks.append(_chunk(completion_id, model, created, [{"index": 0, "delta": {}, "finish_reason": finish_reason or "stop"}]))
    if include_usage:
        chunks.append(_chunk(completion_id, model, created, [], usage=usage))
    return chunks


async def replay(chunks: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    # one write: a cached answer has nothing to wait for
    yield b"".join(sse(c) for c in chunks) + DONE


class StreamAssembler:
    """Rebuilds the assistant message from streamed chunks, to cache it once the stream completes."""

    def __init__(self) -> None:
        self.role = "assistant"
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.cacheable = True  # false once anything but plain text content shows up

    def feed(self, chunk: dict[str, Any]) -> None:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                self.cacheable = False
                continue
            delta = choice.get("delta") or {}
            if delta.get("role"):
                self.role = delta["role"]
            if delta.get("content"):
                self.parts.append(delta["content"])
            if delta.get("tool_calls") or delta.get("function_call"):
                self.cacheable = False
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def message(self) -> dict[str, Any]:
        return {"role": self.role, "content": "".join(self.parts)}
