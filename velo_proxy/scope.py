"""What may be cached, and under which scope.

Scope = tenant + model + everything before the last user turn (system prompt and earlier turns). It is a
hard filter on every lookup: the same question in another scope never hits. The exact key adds the last
user turn and every parameter that shapes the answer.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass
from typing import Any, Mapping

from velo_proxy.protocol import ChatCompletionRequest
from velo_proxy.settings import Settings

# Fields that do not change the answer's content (transport, bookkeeping).
_NOT_ANSWER_SHAPING = frozenset({"messages", "model", "stream", "stream_options", "user", "metadata", "store",
                                 "service_tier", "parallel_tool_calls"})


def content_text(content: Any) -> str | None:
    """The text of a message's content; None when it carries anything but text (images, audio)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            return None
        parts.append(part["text"])
    return "\n".join(parts)


def normal_question(text: str) -> str:
    """The question as ``same_question`` compares it: NFKC, case-folded, runs of white space as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def same_question(a: str, b: str) -> bool:
    """Whether two questions are the same text up to case, spacing and Unicode compatibility forms.
    Within one scope such a hit is the request's own question asked with other parameters (or on another
    replica): its answer needs no judgement, the cross-encoder is for *different* texts (trained on
    distinct pairs, it scores identical ones anywhere between 0.06 and 0.93: benchmarks/verifier_identical.py)."""
    return a == b or normal_question(a) == normal_question(b)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class CacheKey:
    scope: str  # hex digest of tenant + model + context
    question: str  # text of the last user turn
    exact: str  # hex digest of scope + question + answer-shaping parameters


@dataclass(frozen=True, slots=True)
class Gate:
    lookup: bool
    store: bool
    reason: str | None = None  # why not, for logs


def cache_key(chat: ChatCompletionRequest, payload: Mapping[str, Any], *, tenant: str) -> CacheKey | None:
    """None when the request's shape cannot be cached (last turn not a plain-text user message)."""
    last = chat.messages[-1]
    if last.role != "user":
        return None
    question = content_text(last.content)
    if question is None or not question.strip():
        return None
    context = [m.model_dump(exclude_none=True) for m in chat.messages[:-1]]
    scope = _digest({"tenant": tenant, "model": chat.model, "context": context})[:32]
    shaping = {k: v for k, v in payload.items() if k not in _NOT_ANSWER_SHAPING}
    exact = _digest({"scope": scope, "question": question, "params": shaping})
    return CacheKey(scope=scope, question=question, exact=exact)


def cache_gate(chat: ChatCompletionRequest, headers: Mapping[str, str], settings: Settings) -> Gate:
    if not settings.cache_enabled:
        return Gate(False, False, "cache disabled")
    directives = {d.strip().lower() for d in headers.get("cache-control", "").split(",") if d.strip()}
    lookup = "no-cache" not in directives
    store = "no-store" not in directives
    if (chat.n or 1) > 1:
        return Gate(False, False, "n>1")
    # OpenAI's default temperature is 1.0; an unset temperature counts as that.
    temperature = 1.0 if chat.temperature is None else chat.temperature
    if temperature > settings.cache_max_temperature:
        return Gate(False, False, "temperature above cap")
    uses_tools = bool(chat.tools) or any(m.role in ("tool", "function") or m.tool_calls for m in chat.messages)
    if uses_tools and not settings.cache_tools:
        return Gate(False, False, "tools")
    if not (lookup or store):
        return Gate(False, False, "cache-control")
    return Gate(lookup, store, None if lookup and store else "cache-control")
