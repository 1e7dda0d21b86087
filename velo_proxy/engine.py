"""The request pipeline (DESIGN.md, "Request path"), one step per home in ``velo_proxy.pipeline``:

    context (parse -> scope -> cacheability gate -> upstream target)
    -> lookup (exact tier -> embed -> search -> verify)
    -> decide (exact | A | B | C)
    -> act (serve from the cache | forward | forward with context; JSON or SSE)
    -> after the response (store the answer, use counts, exact-tier copy, shadow checks, experience, eviction)

The cache is an optimisation: every call to the embedder, the store, the verifier, Redis and the
policy goes through one guard (deadline, circuit breaker, metric, log line), and any failure sends
the request upstream (B).
"""

from __future__ import annotations

from typing import Any, Mapping

from fastapi.responses import Response

from velo_proxy.pipeline.act import Act
from velo_proxy.pipeline.after import AfterResponse, Maintenance
from velo_proxy.pipeline.components import CacheComponents
from velo_proxy.pipeline.context import Caller, RequestContext
from velo_proxy.pipeline.decide import Decide
from velo_proxy.pipeline.guard import Deadlines
from velo_proxy.pipeline.lookup import Lookup
from velo_proxy.protocol import ChatCompletionRequest
from velo_proxy.services import Services
from velo_proxy.settings import Settings


class ChatEngine:
    def __init__(self, *, settings: Settings, services: Services) -> None:
        self.settings = settings
        self.services = services
        self.metrics = services.metrics
        components = CacheComponents(services=services, guard=services.guard,
                                     deadlines=Deadlines.from_settings(settings), metrics=services.metrics)
        self.lookup = Lookup(components=components, live_guard=services.live_guard)
        # near misses are marked only when some will be reviewed (no work on the path otherwise)
        near_miss_floor = settings.near_miss_floor if settings.near_miss_review_rate > 0 else float("inf")
        self.decide = Decide(guard=services.guard, metrics=services.metrics, live_guard=services.live_guard,
                             near_miss_floor=near_miss_floor, cross_language=settings.cross_language)
        self.after = AfterResponse(components=components, services=services, settings=settings,
                                   metrics=services.metrics)
        self.maintenance = Maintenance(components=components, services=services, settings=settings)
        self.act = Act(upstream=services.upstream, after=self.after, metrics=services.metrics,
                       augment_max_tokens=settings.augment_max_tokens)

    def context(self, chat: ChatCompletionRequest, payload: dict[str, Any], *, caller: Caller, request_id: str,
                headers: Mapping[str, str]) -> RequestContext:
        """The request's context; raises the 404 of an unknown model before any work."""
        return RequestContext.build(chat, payload, caller=caller, target=self.services.upstream.resolve(chat.model),
                                    request_id=request_id, headers=headers, settings=self.settings,
                                    policy=self.services.policies.current)

    async def handle(self, ctx: RequestContext) -> Response:
        found = await self.lookup.find(ctx)
        ctx.trace.choice = choice = self.decide.choose(ctx, found)
        if ctx.lookup_key is not None:
            self.metrics.count_lookup(choice.from_cache)
        if choice.action != "exact":  # xi counts the requests that get past the exact tier
            self.maintenance.tick()
        self.after.follow_choice(ctx)
        if choice.from_cache:
            return self.act.serve_cached(ctx)
        if choice.action == "C":
            self.act.augment(ctx)
        return await self.act.forward(ctx)

    async def feedback(self, response_id: str, score: float, *, tenant: str) -> dict[str, Any]:
        return await self.after.feedback(response_id, score, tenant=tenant)
