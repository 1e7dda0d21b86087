"""What the steps of the request path hand each other: one ``RequestContext`` per request, built
once from the parsed request (so cacheability and the upstream target are decided once), and the
``Choice`` the decide step makes, which says once which cache entry the response uses."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from velo_proxy.policy import Decision, Policy
from velo_proxy.protocol import ChatCompletionRequest
from velo_proxy.scope import CacheKey, Gate, cache_gate, cache_key
from velo_proxy.settings import Settings
from velo_proxy.store.base import Hit
from velo_proxy.upstream import Target


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking. ``tenant`` scopes the cache; ``client_key`` may be forwarded upstream only when
    the proxy has no keys of its own (pass-through use)."""

    tenant: str
    client_key: str | None


#: Actions that answer from the cache without calling the upstream.
FROM_CACHE = ("exact", "A")


@dataclass(frozen=True, slots=True)
class Choice:
    """What the request path does, decided once (``pipeline.decide``)."""

    action: str = "B"  # "exact" | "A" | "B" | "C"
    answer: dict[str, Any] | None = None  # the cached answer served (exact, A)
    hit: Hit | None = None  # the semantic hit served (A) or used as context (C)
    entry: str | None = None  # the cache entry whose answer is served or used as context (exact, A, C)
    similarity: float | None = None  # of the served hit (exact: 1), else of the best hit seen
    verifier_score: float | None = None  # the pair verifier's score of the served (or best) candidate
    same_question: bool = False  # A: the hit's question is the request's own (served without a policy decision)

    @property
    def from_cache(self) -> bool:
        return self.action in FROM_CACHE


@dataclass(frozen=True, slots=True)
class NearMiss:
    """A request forwarded although a candidate was close: what an off-path review judges."""

    hit: Hit  # the candidate: the best-verified hit, else the nearest
    verifier_score: float | None
    served_score: float  # the score the live guard reads (verifier score, or similarity without a verifier)


def guard_score(policy: Policy, hit: Hit, verifier_score: float | None) -> float | None:
    """The score the live guard's floor applies to: the verifier's for policies that verify, the
    cosine similarity for the threshold policy."""
    return verifier_score if policy.verify_rule is not None else hit.similarity


@dataclass
class Trace:
    """What happened to one request; becomes the x-velo-* response headers and the experience."""

    request_id: str
    policy: Policy  # one policy object for the whole request, even if a new version is swapped in meanwhile
    choice: Choice = field(default_factory=Choice)
    decision: Decision | None = None
    entry: str | None = None  # x-velo-entry: the entry served, or the id the new answer is stored under
    started: float = field(default_factory=time.perf_counter)

    @property
    def action(self) -> str:
        return self.choice.action

    def headers(self) -> dict[str, str]:
        similarity, score = self.choice.similarity, self.choice.verifier_score
        return {
            "x-velo-action": self.action,
            "x-velo-similarity": "" if similarity is None else f"{similarity:.4f}",
            "x-velo-verifier": "" if score is None else f"{score:.4f}",
            "x-velo-entry": self.entry or "",
            "x-velo-policy": self.policy.version,
        }


@dataclass
class RequestContext:
    """One chat request on its way through lookup, decide, act and the work after the response."""

    chat: ChatCompletionRequest
    payload: dict[str, Any]  # the body as the client sent it (unknown fields included)
    caller: Caller
    target: Target  # where the model goes upstream (resolved once: an unknown model is a 404 before any work)
    gate: Gate  # may this request be looked up, may its answer be stored
    key: CacheKey | None  # scope, question and exact key; None when the request's shape is not cacheable
    trace: Trace
    new_entry: str | None = None  # the id the upstream's answer gets if it is stored
    vector: np.ndarray | None = None  # the question's embedding, once computed (stored with the answer)
    upstream_payload: dict[str, Any] = field(default_factory=dict)  # what goes upstream (C: augmented)
    near_miss: NearMiss | None = None  # set by decide when the request is forwarded with a close candidate

    @classmethod
    def build(cls, chat: ChatCompletionRequest, payload: dict[str, Any], *, caller: Caller, target: Target,
              request_id: str, headers: Mapping[str, str], settings: Settings, policy: Policy) -> "RequestContext":
        """The request's cacheability, decided once: the gate (settings, Cache-Control, shape of the
        request) and the key (None, and so neither lookup nor store, when the last turn is not a
        plain-text user message)."""
        gate = cache_gate(chat, headers, settings)
        key = cache_key(chat, payload, tenant=caller.tenant) if (gate.lookup or gate.store) else None
        if key is None:
            gate = Gate(False, False, gate.reason or "uncacheable shape")
        return cls(chat=chat, payload=payload, caller=caller, target=target, gate=gate, key=key,
                   trace=Trace(request_id=request_id, policy=policy),
                   new_entry=uuid.uuid4().hex if gate.store else None, upstream_payload=payload)

    @property
    def lookup_key(self) -> CacheKey | None:
        return self.key if self.gate.lookup else None

    @property
    def store_key(self) -> CacheKey | None:
        return self.key if self.gate.store else None

    @property
    def stream(self) -> bool:
        return bool(self.chat.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.chat.stream_options and self.chat.stream_options.include_usage)
