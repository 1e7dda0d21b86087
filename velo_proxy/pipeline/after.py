"""The work that follows a response, off the request's critical path: bookkeeping once the answer is
complete (metrics, the feedback registry, the experience), what the choice implies for the cache
(a used entry's use count; a semantic hit's exact-tier copy and, sampled, a shadow check), storing a
new answer, and the eviction tick every xi requests."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import numpy as np

from velo_proxy.cache_value import INITIAL_VALUE
from velo_proxy.errors import ProxyError
from velo_proxy.metrics import Metrics
from velo_proxy.pipeline.components import CacheComponents
from velo_proxy.pipeline.context import RequestContext, guard_score
from velo_proxy.pipeline.learning import LearningLoop
from velo_proxy.services import Answered, Services
from velo_proxy.settings import Settings
from velo_proxy.store.base import CacheEntry

log = logging.getLogger("velo_proxy.engine")


class Maintenance:
    """Every xi requests: TTL, the per-scope size cap, and the paper's below-mean rule, in the
    background."""

    def __init__(self, *, components: CacheComponents, services: Services, settings: Settings) -> None:
        self.components = components
        self.services = services
        self.settings = settings
        self._requests_since_eviction = 0

    def tick(self) -> None:
        self._requests_since_eviction += 1
        if self.services.store is None or self._requests_since_eviction < self.settings.eviction_interval:
            return
        self._requests_since_eviction = 0
        self.services.spawn(self._evict())

    async def _evict(self) -> None:
        report = await self.components.evict(max_entries_per_scope=self.settings.cache_max_entries,
                                             grace_s=self.settings.eviction_grace_s)
        if report is not None and report.total:
            log.info("eviction: %s expired, %s over size, %s below mean", report.expired, report.over_size,
                     report.below_mean)


class AfterResponse:
    def __init__(self, *, components: CacheComponents, services: Services, settings: Settings,
                 metrics: Metrics) -> None:
        self.components = components
        self.services = services
        self.settings = settings
        self.metrics = metrics
        self.learning = LearningLoop(components=components, services=services, settings=settings, metrics=metrics)

    # ----- what the choice implies ------------------------------------------------------------------
    def follow_choice(self, ctx: RequestContext) -> None:
        """The entry the response uses (served or as C's context) counts one use; a served semantic
        hit also gets an exact-tier copy (its verbatim repeats skip the embedder), and a sampled share
        of them is re-asked upstream (shadow check)."""
        choice = ctx.trace.choice
        if choice.entry is not None:
            self.services.spawn(self.components.record_use(choice.entry))
        if choice.action == "A" and choice.hit is not None:
            assert ctx.key is not None
            policy = ctx.trace.policy
            # the request's own question (same_question) was no decision: its copy is a plain one, like
            # the exact tier's, and there is no hit to judge
            via = None if choice.same_question else {
                "policy": policy.version, "similarity": choice.hit.similarity, "verifier_score": choice.verifier_score,
                "score": guard_score(policy, choice.hit, choice.verifier_score)}
            self.services.spawn(self.components.exact_set(ctx.key, choice.entry, choice.hit.entry.answer,
                                                          ttl_s=self.settings.cache_ttl_s, via=via))
            if not choice.same_question:
                self.learning.after_hit(ctx)

    # ----- once the answer is complete ------------------------------------------------------------
    def finished(self, ctx: RequestContext, completion_id: str | None) -> None:
        """Metrics, the feedback registry and the experience of a complete answer."""
        trace = ctx.trace
        delay = time.perf_counter() - trace.started
        self.metrics.requests.labels(trace.action).inc()
        self.metrics.request_latency.labels(trace.action).observe(delay)
        self.services.recent.add(Answered(trace.request_id, trace.action, trace.choice.entry,
                                          tenant=ctx.caller.tenant), completion_id)
        decision = trace.decision
        if self.services.experience is not None and decision is not None and decision.observation is not None:
            self.services.spawn(self.components.log_decision(
                request_id=trace.request_id, action=decision.action, probability=decision.probability,
                probs=decision.probs, explored=decision.explored, policy=trace.policy.version, delay_s=delay,
                entry=decision.entry.entry.id if decision.entry is not None else None,
                observation=decision.observation, observed_at=decision.observed_at,
                embedder=self.services.embedder.id))

    def store(self, ctx: RequestContext, answer: dict[str, Any]) -> str | None:
        """Store the upstream's complete answer under the request's key, in the background, when the
        request may be stored; returns the id it gets (None: not stored)."""
        key = ctx.store_key
        if key is None:
            return None
        self.services.spawn(self._store(ctx, answer, review=self.learning.wants_review(ctx)))
        return ctx.new_entry

    async def _store(self, ctx: RequestContext, answer: dict[str, Any], *, review: bool = False) -> None:
        """Store the answer (semantic store, then its exact-tier copy); then, for a sampled near miss,
        the off-path review, which may turn the new entry into an alias."""
        key = ctx.store_key
        assert key is not None
        stored_id = None
        if self.components.semantic_ready:
            vector = ctx.vector
            if vector is None:
                vectors = await self.components.embed([key.question])
                vector = vectors[0] if vectors is not None else None
            if vector is not None:
                now = time.time()
                entry = CacheEntry(scope=key.scope, vector=np.asarray(vector, dtype=np.float32), question=key.question,
                                   answer=answer, model=ctx.chat.model, expires_at=now + self.settings.cache_ttl_s,
                                   created_at=now, cache_value=INITIAL_VALUE, id=ctx.new_entry or uuid.uuid4().hex)
                if await self.components.add(entry):
                    stored_id = entry.id
        await self.components.exact_set(key, stored_id, answer, ttl_s=self.settings.cache_ttl_s)
        if review:
            await self.learning.review_near_miss(ctx, answer, stored_id)

    # ----- rewards --------------------------------------------------------------------------------
    async def feedback(self, response_id: str, score: float, *, tenant: str) -> dict[str, Any]:
        """An explicit score in [0, 1] for a recent response of ``tenant``: reward in the stream, and
        for answers served from the cache, an outcome folded into the entry's cache value. Another
        tenant's response is answered exactly like an unknown id (404)."""
        answered = self.services.recent.get(response_id, tenant=tenant)
        if answered is None:
            # the same answer for an unknown id and for another tenant's: nothing tells them apart
            raise ProxyError(404, "No recent response with this id for this caller on this proxy.", param="id",
                             code="response_not_found")
        if answered.entry and answered.action in ("A", "exact", "C"):
            await self.components.record_use(answered.entry, outcome=score)
        # satisfaction on the paper's scale: -L2 between unit vectors spans [-2, 0]
        logged = await self.components.log_reward(answered.request_id, source="feedback", q=2.0 * (score - 1.0),
                                                  score=score)
        return {"id": response_id, "request_id": answered.request_id, "action": answered.action,
                "entry": answered.entry, "recorded": True, "experience": logged}
