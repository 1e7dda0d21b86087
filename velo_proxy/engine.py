"""The request pipeline (DESIGN.md, "Request path"):

parse -> scope -> cacheability gate -> exact tier -> embed -> search -> policy -> act (A | B | C)
-> store the new answer -> maintenance.

The cache is an optimisation: the embedder, the store and Redis each sit behind a deadline and a
circuit breaker, and any failure sends the request upstream (B) with a metric and a log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from velo_proxy.cache_value import INITIAL_VALUE
from velo_proxy.errors import ProxyError, error_event
from velo_proxy.exact import ExactTier, LocalExactTier, RedisExactTier
from velo_proxy.metrics import Metrics
from velo_proxy.policy import Decision, Policy, ThresholdPolicy
from velo_proxy.protocol import ChatCompletionRequest, completion_from_message
from velo_proxy.scope import CacheKey, Gate, cache_gate, cache_key
from velo_proxy.settings import Settings
from velo_proxy.sse import DONE, StreamAssembler, replay, replay_chunks, sse
from velo_proxy.store.base import CacheEntry, CacheStore, Hit
from velo_proxy.upstream import Upstream

log = logging.getLogger("velo_proxy.engine")
T = TypeVar("T")

BREAKER_COOLDOWN_S = 5.0  # after a failure, skip a component this long instead of paying its timeout again
REDIS_TIMEOUT_S = 0.25


class Breaker:
    """Per-component circuit breaker: open for a cool-down after a failure."""

    def __init__(self, cooldown_s: float = BREAKER_COOLDOWN_S) -> None:
        self.cooldown_s = cooldown_s
        self._open_until: dict[str, float] = {}

    def allows(self, component: str) -> bool:
        return time.monotonic() >= self._open_until.get(component, 0.0)

    def trip(self, component: str) -> None:
        self._open_until[component] = time.monotonic() + self.cooldown_s

    def reset(self, component: str) -> None:
        self._open_until.pop(component, None)


@dataclass
class Services:
    """Long-lived components, created in the app's lifespan and closed there."""

    settings: Settings
    metrics: Metrics
    upstream: Upstream
    exact: ExactTier
    policy: Policy
    embedder: Any = None  # velo_proxy.embedder.Embedder
    store: CacheStore | None = None
    redis: Any = None  # redis.asyncio.Redis
    load_errors: dict[str, str] = field(default_factory=dict)
    breaker: Breaker = field(default_factory=Breaker)
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    @classmethod
    async def start(cls, *, settings: Settings, metrics: Metrics) -> "Services":
        upstream = Upstream(
            base_url=settings.upstream_base_url,
            api_key=settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None,
            model_map=settings.model_map,
            timeout_s=settings.upstream_timeout_s,
            max_retries=settings.upstream_max_retries,
        )
        await upstream.start()
        redis_client = None
        if settings.redis_url:
            import redis.asyncio as aioredis

            redis_client = aioredis.from_url(settings.redis_url, socket_timeout=REDIS_TIMEOUT_S,
                                             socket_connect_timeout=REDIS_TIMEOUT_S, decode_responses=True)
        exact: ExactTier = (RedisExactTier(redis_client) if redis_client is not None
                            else LocalExactTier(max_entries=settings.exact_cache_size))
        services = cls(settings=settings, metrics=metrics, upstream=upstream, exact=exact,
                       policy=ThresholdPolicy(threshold=settings.similarity_threshold), redis=redis_client)
        if settings.cache_enabled:
            await services._load_cache()
        services.metrics.policy_version.labels(services.policy.version).set(1)
        return services

    async def _load_cache(self) -> None:
        from velo_proxy.embedder import build_embedder
        from velo_proxy.store import open_store

        try:
            embedder = build_embedder(self.settings)
            await embedder.start()
            self.embedder = embedder
        except Exception as exc:  # noqa: BLE001 - fail open: serve without the semantic tier
            self.load_errors["embedder"] = f"{type(exc).__name__}: {exc}"
            log.error("embedder unavailable, semantic cache off: %s", exc)
            return
        try:
            self.store = await asyncio.to_thread(open_store, self.settings, dim=self.embedder.dim)
        except Exception as exc:  # noqa: BLE001
            self.load_errors["store"] = f"{type(exc).__name__}: {exc}"
            log.error("cache store unavailable, semantic cache off: %s", exc)

    @property
    def semantic_ready(self) -> bool:
        return self.embedder is not None and self.store is not None

    async def aclose(self) -> None:
        if self.background:
            await asyncio.wait(list(self.background), timeout=5.0)
        await self.upstream.aclose()
        if self.embedder is not None:
            await self.embedder.aclose()
        if self.store is not None:
            await asyncio.to_thread(self.store.close)
        await self.exact.aclose()
        if self.redis is not None:
            await self.redis.aclose()

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run work after the response without losing the task (and its exceptions) to the GC."""
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def readiness(self) -> dict[str, tuple[bool, str]]:
        checks: dict[str, tuple[bool, str]] = {"upstream": (True, "configured" if self.upstream.base_url or self.upstream.model_map else "not configured")}
        if self.settings.cache_enabled:
            checks["embedder"] = (self.embedder is not None, self.load_errors.get("embedder", "loaded"))
            checks["store"] = (self.store is not None, self.load_errors.get("store", "open"))
        if self.redis is not None:
            try:
                await asyncio.wait_for(self.redis.ping(), REDIS_TIMEOUT_S)
                checks["redis"] = (True, "ok")
            except Exception as exc:  # noqa: BLE001 - Redis down degrades, it does not make us unready
                checks["redis"] = (True, f"degraded (fail-open): {type(exc).__name__}")
        return checks

    def refresh_gauges(self) -> None:
        if self.store is not None:
            try:
                self.metrics.store_entries.set(len(self.store))
            except Exception:  # noqa: BLE001
                pass


@dataclass
class Trace:
    """What happened to one request; becomes the x-velo-* response headers."""

    request_id: str
    action: str = "B"
    similarity: float | None = None
    entry: str | None = None
    policy: str = ""
    started: float = field(default_factory=time.perf_counter)

    def headers(self) -> dict[str, str]:
        return {
            "x-velo-action": self.action,
            "x-velo-similarity": "" if self.similarity is None else f"{self.similarity:.4f}",
            "x-velo-entry": self.entry or "",
            "x-velo-policy": self.policy,
        }


class ChatEngine:
    def __init__(self, *, settings: Settings, services: Services) -> None:
        self.settings = settings
        self.services = services
        self.metrics = services.metrics
        self._requests_since_eviction = 0

    # ----- fail-open plumbing -------------------------------------------------------------------
    async def _guarded(self, component: str, call: Callable[[], Awaitable[T]], *, timeout_s: float) -> T | None:
        """Run ``call`` under a deadline; on failure count it, trip the breaker and return None."""
        if not self.services.breaker.allows(component):
            self.metrics.failures.labels(component, "breaker_open").inc()
            return None
        try:
            result = await asyncio.wait_for(call(), timeout_s)
        except asyncio.TimeoutError:
            self._fail(component, "timeout", None)
            return None
        except Exception as exc:  # noqa: BLE001 - the cache never fails a request
            self._fail(component, type(exc).__name__, exc)
            return None
        return result

    def _fail(self, component: str, reason: str, exc: BaseException | None) -> None:
        self.metrics.failures.labels(component, reason).inc()
        self.services.breaker.trip(component)
        log.warning("%s failed (%s), failing open%s", component, reason, f": {exc}" if exc else "")

    async def _embed(self, text: str) -> np.ndarray | None:
        embedder = self.services.embedder
        t0 = time.perf_counter()
        vectors = await self._guarded("embedder", lambda: embedder.embed([text]),
                                      timeout_s=self.settings.embed_timeout_ms / 1000)
        if vectors is None:
            return None
        self.metrics.embed_latency.observe(time.perf_counter() - t0)
        return vectors[0]

    async def _search(self, scope: str, vector: np.ndarray) -> list[Hit] | None:
        store = self.services.store
        t0 = time.perf_counter()
        hits = await self._guarded(
            "store", lambda: asyncio.to_thread(store.search, scope, vector, limit=self.settings.top_p_hits),
            timeout_s=self.settings.search_timeout_ms / 1000)
        if hits is not None:
            self.metrics.search_latency.observe(time.perf_counter() - t0)
        return hits

    async def _exact_get(self, key: CacheKey) -> dict[str, Any] | None:
        return await self._guarded("exact", lambda: self.services.exact.get(key.scope, key.exact),
                                   timeout_s=REDIS_TIMEOUT_S * 2)

    # ----- the pipeline -------------------------------------------------------------------------
    async def handle(self, chat: ChatCompletionRequest, payload: dict[str, Any], *, caller: Any,
                     request: Request) -> Response:
        trace = Trace(request_id=request.state.request_id, policy=self.services.policy.version)
        self.services.upstream.resolve(chat.model)  # unknown model -> 404 before any work
        gate = cache_gate(chat, request.headers, self.settings)
        key = cache_key(chat, payload, tenant=caller.tenant) if (gate.lookup or gate.store) else None
        if key is None:
            gate = Gate(False, False, gate.reason or "uncacheable shape")
        stream = bool(chat.stream)
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        vector: np.ndarray | None = None

        if gate.lookup:
            assert key is not None
            cached = await self._exact_get(key)
            if cached is not None and await self._still_valid(cached):
                trace.action, trace.entry, trace.similarity = "exact", cached.get("entry"), 1.0
                self.metrics.count_lookup(True)
                if cached.get("entry"):
                    self.services.spawn(self._record_use(cached["entry"]))
                return self._serve(chat, cached["answer"], trace, stream=stream, include_usage=include_usage)
            if self.services.semantic_ready:
                vector = await self._embed(key.question)
                hits = await self._search(key.scope, vector) if vector is not None else None
                if hits is not None:
                    decision = self.services.policy.decide(vector, hits, now=time.time())
                    trace.similarity = hits[0].similarity if hits else None
                    if decision.action == "A" and decision.entry is not None:
                        return self._serve_hit(chat, key, decision, trace, stream=stream, include_usage=include_usage)
            self.metrics.count_lookup(False)

        self._tick_maintenance()
        store_key = key if gate.store else None
        if store_key is not None:
            trace.entry = uuid.uuid4().hex  # the id this answer will be stored under
        if stream:
            return await self._forward_stream(chat, payload, caller, trace, store_key, vector, include_usage)
        return await self._forward(chat, payload, caller, trace, store_key, vector)

    async def _still_valid(self, cached: dict[str, Any]) -> bool:
        """An exact-tier answer whose store entry was deleted (admin, eviction) is stale."""
        entry_id = cached.get("entry")
        store = self.services.store
        if not entry_id or store is None:
            return True
        found = await self._guarded("store", lambda: asyncio.to_thread(store.get, entry_id),
                                    timeout_s=self.settings.search_timeout_ms / 1000)
        return found is not None or not self.services.breaker.allows("store")

    def _serve_hit(self, chat: ChatCompletionRequest, key: CacheKey, decision: Decision, trace: Trace, *,
                   stream: bool, include_usage: bool) -> Response:
        hit = decision.entry
        assert hit is not None
        trace.action, trace.entry, trace.similarity = "A", hit.entry.id, hit.similarity
        self.metrics.count_lookup(True)
        self.services.spawn(self._record_use(hit.entry.id))
        self.services.spawn(self._exact_set(key, hit.entry.id, hit.entry.answer))
        self._tick_maintenance()
        return self._serve(chat, hit.entry.answer, trace, stream=stream, include_usage=include_usage)

    def _serve(self, chat: ChatCompletionRequest, answer: dict[str, Any], trace: Trace, *, stream: bool,
               include_usage: bool) -> Response:
        completion_id = f"chatcmpl-velo-{uuid.uuid4().hex[:24]}"
        self.metrics.requests.labels(trace.action).inc()
        self.metrics.request_latency.labels(trace.action).observe(time.perf_counter() - trace.started)
        if stream:
            chunks = replay_chunks(completion_id=completion_id, model=chat.model, message=answer["message"],
                                   finish_reason=answer.get("finish_reason"), usage=answer.get("usage"),
                                   include_usage=include_usage)
            return StreamingResponse(replay(chunks), media_type="text/event-stream", headers=trace.headers())
        body = completion_from_message(completion_id=completion_id, model=chat.model, message=answer["message"],
                                       finish_reason=answer.get("finish_reason"), usage=answer.get("usage"))
        return JSONResponse(body, headers=trace.headers())

    async def _forward(self, chat: ChatCompletionRequest, payload: dict[str, Any], caller: Any, trace: Trace,
                       store_key: CacheKey | None, vector: np.ndarray | None) -> Response:
        t0 = time.perf_counter()
        data = await self.services.upstream.complete(payload, client_key=caller.client_key)
        self.metrics.upstream_latency.observe(time.perf_counter() - t0)
        choice = (data.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        if store_key is not None and choice.get("finish_reason") == "stop" and not message.get("tool_calls") \
                and isinstance(message.get("content"), str):
            answer = {"message": {"role": "assistant", "content": message["content"]},
                      "finish_reason": "stop", "usage": data.get("usage")}
            self.services.spawn(self._store_answer(store_key, vector, answer, chat.model, trace.entry))
        else:
            trace.entry = None
        self.metrics.requests.labels(trace.action).inc()
        self.metrics.request_latency.labels(trace.action).observe(time.perf_counter() - trace.started)
        return JSONResponse(data, headers=trace.headers())

    async def _forward_stream(self, chat: ChatCompletionRequest, payload: dict[str, Any], caller: Any,
                              trace: Trace, store_key: CacheKey | None, vector: np.ndarray | None,
                              include_usage: bool) -> Response:
        t0 = time.perf_counter()
        chunks = await self.services.upstream.stream(payload, client_key=caller.client_key)

        async def relay() -> AsyncIterator[bytes]:
            assembler = StreamAssembler()
            try:
                async for chunk in chunks:
                    assembler.feed(chunk)
                    yield sse(chunk)
            except ProxyError as err:
                # headers are gone: tell the client in-band; the OpenAI SDKs raise on this event
                self.metrics.errors.labels(str(err.status)).inc()
                log.warning("upstream stream failed mid-way: %s", err.message)
                yield error_event(err)
                return
            yield DONE
            self.metrics.upstream_latency.observe(time.perf_counter() - t0)
            self.metrics.requests.labels(trace.action).inc()
            self.metrics.request_latency.labels(trace.action).observe(time.perf_counter() - trace.started)
            # only a stream that completed normally is cached
            if store_key is not None and assembler.cacheable and assembler.finish_reason == "stop":
                answer = {"message": assembler.message(), "finish_reason": "stop", "usage": assembler.usage}
                self.services.spawn(self._store_answer(store_key, vector, answer, chat.model, trace.entry))

        return StreamingResponse(relay(), media_type="text/event-stream", headers=trace.headers())

    # ----- after the response -------------------------------------------------------------------
    async def _store_answer(self, key: CacheKey, vector: np.ndarray | None, answer: dict[str, Any], model: str,
                            entry_id: str | None) -> None:
        stored_id = None
        store = self.services.store
        if self.services.semantic_ready:
            if vector is None:
                vector = await self._embed(key.question)
            if vector is not None:
                now = time.time()
                entry = CacheEntry(scope=key.scope, vector=np.asarray(vector, dtype=np.float32), question=key.question,
                                   answer=answer, model=model, expires_at=now + self.settings.cache_ttl_s,
                                   created_at=now, cache_value=INITIAL_VALUE, id=entry_id or uuid.uuid4().hex)
                added = await self._guarded("store", lambda: asyncio.to_thread(store.add, [entry]),
                                            timeout_s=max(1.0, self.settings.search_timeout_ms / 1000 * 5))
                if added is not None or self.services.breaker.allows("store"):
                    stored_id = entry.id
        await self._exact_set(key, stored_id, answer)

    async def _exact_set(self, key: CacheKey, entry_id: str | None, answer: dict[str, Any]) -> None:
        await self._guarded("exact", lambda: self.services.exact.set(
            key.scope, key.exact, {"entry": entry_id, "answer": answer}, ttl_s=self.settings.cache_ttl_s),
            timeout_s=REDIS_TIMEOUT_S * 2)

    async def _record_use(self, entry_id: str, outcome: float = 1.0) -> None:
        store = self.services.store
        if store is not None:
            await self._guarded("store", lambda: asyncio.to_thread(store.record_use, entry_id, outcome=outcome),
                                timeout_s=1.0)

    def _tick_maintenance(self) -> None:
        """Every xi requests: TTL, size cap, and the paper's below-mean rule, in the background."""
        self._requests_since_eviction += 1
        store = self.services.store
        if store is None or self._requests_since_eviction < self.settings.eviction_interval:
            return
        self._requests_since_eviction = 0

        async def evict() -> None:
            report = await self._guarded("store", lambda: asyncio.to_thread(
                store.evict, now=time.time(), max_entries=self.settings.cache_max_entries, below_mean=True,
                grace_s=self.settings.eviction_grace_s), timeout_s=30.0)
            if report is not None and report.total:
                log.info("eviction: %s expired, %s over size, %s below mean", report.expired, report.over_size,
                         report.below_mean)

        self.services.spawn(evict())
