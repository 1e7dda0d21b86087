"""Lookup: what the cache has for a request. The exact tier first (a verbatim repeat, checked
against the store so a deleted entry's copy is not served), then the semantic tier: embed the
question, search the top-P hits in its scope, and have the pair verifier score the hits the policy
wants verified, in one batched call. A hit whose question is the request's own (``scope.same_question``:
the same text asked with other parameters, or on another replica) needs no verification."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from velo_proxy.live_guard import LiveGuard
from velo_proxy.pipeline.components import CacheComponents
from velo_proxy.pipeline.context import RequestContext
from velo_proxy.scope import same_question
from velo_proxy.store.base import Hit


@dataclass(frozen=True, slots=True)
class Found:
    """What the lookup found. Nothing at all (``Found()``) when the request is not looked up or the
    semantic tier is unavailable or failed: the request then goes upstream."""

    exact: dict[str, Any] | None = None  # a valid exact-tier copy: {"entry": id | None, "answer": {...}}
    hits: list[Hit] | None = None  # the scope's nearest entries, best first ([]: none; None: no search)
    scores: dict[int, float] | None = None  # verifier scores by hit index ({}: none to verify; None: failed)
    same_question: int | None = None  # index of a hit whose question is the request's own (then nothing is verified)


class Lookup:
    def __init__(self, *, components: CacheComponents, live_guard: LiveGuard | None = None) -> None:
        self.components = components
        self.live_guard = live_guard

    async def find(self, ctx: RequestContext) -> Found:
        key = ctx.lookup_key
        if key is None:
            return Found()
        cached = await self.components.exact_get(key)
        if cached is not None and self._clears_floor(cached, key.scope) and await self._still_stored(cached):
            return Found(exact=cached)
        if not self.components.semantic_ready:
            return Found()
        vectors = await self.components.embed([key.question])
        if vectors is None:
            return Found()
        ctx.vector = vectors[0]
        hits = await self.components.search(key.scope, ctx.vector, limit=ctx.trace.policy.top_p)
        if hits is None:
            return Found()
        same = next((i for i, h in enumerate(hits) if same_question(key.question, h.entry.question)), None)
        if same is not None:
            return Found(hits=hits, scores={}, same_question=same)
        return Found(hits=hits, scores=await self._verify(ctx, hits) if hits else None)

    def _clears_floor(self, cached: dict[str, Any], scope: str) -> bool:
        """The copy of a semantic hit is served again only while its score clears the live guard's
        floor for the policy that served it (a verbatim repeat of a near miss is still that near miss)."""
        via = cached.get("via")
        if not via or self.live_guard is None:
            return True
        score = via.get("score")
        return score is not None and score >= self.live_guard.floor(str(via.get("policy")), scope)

    async def _still_stored(self, cached: dict[str, Any]) -> bool:
        """An exact-tier answer whose store entry was deleted (admin, eviction, failed shadow check)
        is stale."""
        entry_id = cached.get("entry")
        return not entry_id or await self.components.contains(entry_id)

    async def _verify(self, ctx: RequestContext, hits: list[Hit]) -> dict[int, float] | None:
        """The verifier's scores of the hits the policy wants verified: {} when none qualifies, None
        when the verifier is missing, slow or failing (the policy then serves nothing semantically:
        it fails safe)."""
        indices = ctx.trace.policy.to_verify(hits)
        if not indices:
            return {}
        assert ctx.key is not None
        scores = await self.components.verify(ctx.key.question, [hits[i].entry.question for i in indices])
        return None if scores is None else dict(zip(indices, scores))
