"""OpenAI chat-completion protocol models: what the proxy validates. Unknown fields are kept
(``extra="allow"``) and forwarded to the upstream untouched. Validation is strict (no "true" for a
bool, no 1.0 for an int): the proxy forwards the body as sent, so the values it decides on (stream or
not, the temperature gate) must be the ones the upstream gets."""

from __future__ import annotations

import math
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from velo_proxy.errors import ProxyError

# Deeper JSON is refused (400): nothing in the chat protocol nests this far (a tool's JSON schema
# of 30 levels is ~60 here), and the proxy, litellm and the upstream all walk bodies recursively.
MAX_JSON_DEPTH = 100
# Roles whose message must carry content (only an assistant turn may have none, e.g. tool calls).
_CONTENT_REQUIRED = frozenset({"system", "developer", "user", "tool"})


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: bool | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None


def _param(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path) or "body"


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone UTF-16 surrogate (JSON "\ud800"): not Unicode text
        return False
    return True


def check_json(value: Any) -> None:
    """Refuse, with the field named, what parses but is not valid JSON data and would break the
    proxy or the upstream later: lone UTF-16 surrogates (no encoding can write them: they break
    hashing and forwarding), NaN and Infinity (not JSON; the upstream's encoder refuses them), and
    nesting deeper than ``MAX_JSON_DEPTH``. Iterative, so no input can exhaust the stack."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            if not _is_text(node):
                raise ProxyError(400, f"Invalid value for '{_param(path)}': the string contains a lone UTF-16 "
                                 "surrogate, which is not valid Unicode.", param=_param(path), code="invalid_value")
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise ProxyError(400, f"Invalid value for '{_param(path)}': {node} is not a JSON number.",
                                 param=_param(path), code="invalid_value")
        elif isinstance(node, (dict, list)):
            if len(path) >= MAX_JSON_DEPTH:
                raise ProxyError(400, f"The JSON body is nested deeper than {MAX_JSON_DEPTH} levels.",
                                 param=_param(path[:1]), code="nesting_too_deep")
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, child in items:
                if isinstance(key, str) and not _is_text(key):
                    raise ProxyError(400, f"Invalid field name in '{_param(path)}': it contains a lone UTF-16 "
                                     "surrogate.", param=_param(path), code="invalid_value")
                stack.append((child, (*path, key)))


def check_chat(chat: ChatCompletionRequest) -> None:
    """What the types alone do not say: content is required except on assistant turns, and a
    content part is an object with a ``type``, whose ``text`` (for text parts) is a string."""
    for i, message in enumerate(chat.messages):
        if message.content is None and message.role in _CONTENT_REQUIRED:
            raise ProxyError(400, f"Invalid value for 'messages.{i}.content': a {message.role} message needs "
                             "content.", param=f"messages.{i}.content", code="invalid_value")
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            where = f"messages.{i}.content.{j}"
            if not isinstance(part.get("type"), str):
                raise ProxyError(400, f"Invalid value for '{where}.type': a content part needs a string 'type'.",
                                 param=f"{where}.type", code="invalid_value")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise ProxyError(400, f"Invalid value for '{where}.text': a text part's text must be a string.",
                                 param=f"{where}.text", code="invalid_value")


class Feedback(BaseModel):
    """POST /v1/feedback: a user's score for a recent response."""

    id: str = Field(min_length=1, description="The response's id (chatcmpl-...) or its x-velo-request-id.")
    score: float = Field(ge=0, le=1, description="1 = the answer was right and useful, 0 = wrong.")
    comment: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "velo-proxy"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def completion_from_message(*, completion_id: str, model: str, message: dict[str, Any],
                            finish_reason: str | None, usage: dict[str, Any] | None) -> dict[str, Any]:
    """A ``chat.completion`` object around one assistant message (used to answer from the cache)."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason or "stop", "logprobs": None}],
        "usage": usage,
    }
