"""The request pipeline (DESIGN.md, "Request path"):

parse -> scope -> cacheability gate -> exact tier -> embed -> search -> policy -> act (A | B | C)
-> store the new answer -> experience, shadow checks, maintenance (after the response).

The cache is an optimisation: the embedder, the store and Redis each sit behind a deadline and a
circuit breaker, and any failure sends the request upstream (B) with a metric and a log line.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from velo_proxy.augment import augmented_payload
from velo_proxy.cache_value import INITIAL_VALUE
from velo_proxy.errors import ProxyError, error_event
from velo_proxy.policy import Decision, Policy
from velo_proxy.protocol import ChatCompletionRequest, completion_from_message
from velo_proxy.scope import CacheKey, Gate, cache_gate, cache_key
from velo_proxy.services import REDIS_TIMEOUT_S, Answered, Services
from velo_proxy.settings import Settings
from velo_proxy.sse import DONE, StreamAssembler, replay, replay_chunks, sse
from velo_proxy.store.base import CacheEntry, Hit

log = logging.getLogger("velo_proxy.engine")
T = TypeVar("T")


@dataclass
class Trace:
    """What happened to one request; becomes the x-velo-* response headers and the experience."""

    request_id: str
    policy: Policy
    action: str = "B"
    similarity: float | None = None
    entry: str | None = None
    decision: Decision | None = None
    started: float = field(default_factory=time.perf_counter)
    tenant: str = ""  # whose response this is: only this tenant may give feedback on it
    verifier_score: float | None = None  # the pair verifier's score of the served (or best) candidate

    def headers(self) -> dict[str, str]:
        return {
            "x-velo-action": self.action,
            "x-velo-similarity": "" if self.similarity is None else f"{self.similarity:.4f}",
            "x-velo-verifier": "" if self.verifier_score is None else f"{self.verifier_score:.4f}",
            "x-velo-entry": self.entry or "",
            "x-velo-policy": self.policy.version,
        }


def answer_agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(cosine, q) of two answer embeddings; q = -L2 distance, the paper's satisfaction (Eq. 2)."""
    cosine = float(np.dot(a, b))
    return cosine, -math.sqrt(max(0.0, 2.0 - 2.0 * cosine))


class ChatEngine:
    def __init__(self, *, settings: Settings, services: Services) -> None:
        self.settings = settings
        self.services = services
        self.metrics = services.metrics
        self._requests_since_eviction = 0
        self._rng = random.Random()

    # ----- fail-open plumbing -------------------------------------------------------------------
    async def _guarded(self, component: str, call: Callable[[], Awaitable[T]], *, timeout_s: float) -> T | None:
        """Run ``call`` under a deadline; on failure count it towards the breaker and return None."""
        if not self.services.breaker.allows(component):
            self.metrics.failures.labels(component, "breaker_open").inc()
            return None
        try:
            result = await asyncio.wait_for(call(), timeout_s)
            self.services.breaker.succeeded(component)
            return result
        except asyncio.TimeoutError:
            self._fail(component, "timeout", None)
        except Exception as exc:  # noqa: BLE001 - the cache never fails a request
            self._fail(component, type(exc).__name__, exc)
        return None

    def _fail(self, component: str, reason: str, exc: BaseException | None) -> None:
        self.metrics.failures.labels(component, reason).inc()
        self.services.breaker.trip(component)
        log.warning("%s failed (%s), failing open%s", component, reason, f": {exc}" if exc else "")

    async def _embed(self, texts: list[str]) -> np.ndarray | None:
        embedder = self.services.embedder
        t0 = time.perf_counter()
        vectors = await self._guarded("embedder", lambda: embedder.embed(texts),
                                      timeout_s=self.settings.embed_timeout_ms / 1000)
        if vectors is not None:
            self.metrics.embed_latency.observe(time.perf_counter() - t0)
        return vectors

    async def _search(self, scope: str, vector: np.ndarray, limit: int) -> list[Hit] | None:
        store = self.services.store
        t0 = time.perf_counter()
        hits = await self._guarded("store", lambda: asyncio.to_thread(store.search, scope, vector, limit=limit),
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
        # one policy object for the whole request, even if a new version is swapped in meanwhile
        trace = Trace(request_id=request.state.request_id, policy=self.services.policy, tenant=caller.tenant)
        self.services.upstream.resolve(chat.model)  # unknown model -> 404 before any work
        gate = cache_gate(chat, request.headers, self.settings)
        key = cache_key(chat, payload, tenant=caller.tenant) if (gate.lookup or gate.store) else None
        if key is None:
            gate = Gate(False, False, gate.reason or "uncacheable shape")
        stream = bool(chat.stream)
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        vector: np.ndarray | None = None
        forward_payload = payload

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
                vectors = await self._embed([key.question])
                vector = vectors[0] if vectors is not None else None
                hits = await self._search(key.scope, vector, trace.policy.top_p) if vector is not None else None
                scores = await self._verify(trace.policy, key.question, hits) if hits else None
                decision = self._decide(trace.policy, vector, hits, scores) if hits is not None else None
                if decision is not None:
                    trace.decision = decision
                    trace.similarity = hits[0].similarity if hits else None
                    trace.verifier_score = decision.verifier_score
                    self._count_verification(trace.policy, hits, scores, decision)
                    if decision.action == "A" and decision.entry is not None:
                        return self._serve_hit(chat, payload, key, decision, trace, caller, stream=stream,
                                               include_usage=include_usage)
                    if decision.action == "C" and decision.entry is not None:
                        trace.action = "C"
                        forward_payload = augmented_payload(
                            payload, question=decision.entry.entry.question,
                            answer=str(decision.entry.entry.answer["message"].get("content") or ""),
                            max_tokens=self.settings.augment_max_tokens)
                        self.services.spawn(self._record_use(decision.entry.entry.id))
            self.metrics.count_lookup(False)

        self._tick_maintenance()
        store_key = key if gate.store else None
        new_entry = uuid.uuid4().hex if store_key is not None else None
        if stream:
            return await self._forward_stream(chat, forward_payload, caller, trace, store_key, vector, new_entry)
        return await self._forward(chat, forward_payload, caller, trace, store_key, vector, new_entry)

    async def _verify(self, policy: Policy, question: str, hits: list[Hit]) -> dict[int, float] | None:
        """The verifier's scores of the hits the policy wants verified, in one batched call: {} when
        none qualifies, None when the verifier is missing, slow or failing (the policy then serves
        nothing semantically: it fails safe)."""
        indices = policy.to_verify(hits)
        if not indices:
            return {}
        verifier = self.services.verifier
        if verifier is None:
            return None
        t0 = time.perf_counter()
        scores = await self._guarded("verifier", lambda: verifier.score(question, [hits[i].entry.question for i in indices]),
                                     timeout_s=self.settings.verifier_timeout_ms / 1000)
        if scores is None:
            return None
        self.metrics.verifier_latency.observe(time.perf_counter() - t0)
        self.metrics.verifier_pairs.inc(len(indices))
        return {i: float(s) for i, s in zip(indices, scores)}

    def _count_verification(self, policy: Policy, hits: list[Hit], scores: dict[int, float] | None,
                            decision: Decision) -> None:
        if policy.verify_rule is None or not hits:
            return
        if scores is None:
            outcome = "failed"
        elif not scores:
            outcome = "no_candidate"
        elif decision.vetoed:
            outcome = "vetoed"
        else:
            outcome = "served" if decision.action == "A" else "rejected"
        self.metrics.verifier_outcomes.labels(outcome).inc()

    def _decide(self, policy: Policy, vector: np.ndarray, hits: list[Hit],
                scores: dict[int, float] | None = None) -> Decision | None:
        """The policy's decision; a policy that fails at run time fails open (B) like any component."""
        if not self.services.breaker.allows("policy"):
            self.metrics.failures.labels("policy", "breaker_open").inc()
            return None
        try:
            decision = policy.decide(vector, hits, now=time.time(), scores=scores)
        except Exception as exc:  # noqa: BLE001
            self._fail("policy", type(exc).__name__, exc)
            return None
        self.services.breaker.succeeded("policy")
        return decision

    async def _still_valid(self, cached: dict[str, Any]) -> bool:
        """An exact-tier answer whose store entry was deleted (admin, eviction, failed shadow check)
        is stale."""
        entry_id = cached.get("entry")
        store = self.services.store
        if not entry_id or store is None:
            return True
        if store.cheap_contains:
            try:
                return store.contains(entry_id)
            except Exception as exc:  # noqa: BLE001 - a closed or broken store: serve the exact copy
                self._fail("store", type(exc).__name__, exc)
                return True
        found = await self._guarded("store", lambda: asyncio.to_thread(store.contains, entry_id),
                                    timeout_s=self.settings.search_timeout_ms / 1000)
        return found is not False

    def _serve_hit(self, chat: ChatCompletionRequest, payload: dict[str, Any], key: CacheKey, decision: Decision,
                   trace: Trace, caller: Any, *, stream: bool, include_usage: bool) -> Response:
        hit = decision.entry
        assert hit is not None
        trace.action, trace.entry, trace.similarity = "A", hit.entry.id, hit.similarity
        self.metrics.count_lookup(True)
        self.services.spawn(self._record_use(hit.entry.id))
        self.services.spawn(self._exact_set(key, hit.entry.id, hit.entry.answer))
        self._tick_maintenance()
        response = self._serve(chat, hit.entry.answer, trace, stream=stream, include_usage=include_usage)
        if self.settings.shadow_rate > 0 and self._rng.random() < self.settings.shadow_rate:
            self.services.spawn(self._shadow_check(payload, caller, hit, trace.request_id))
        return response

    def _serve(self, chat: ChatCompletionRequest, answer: dict[str, Any], trace: Trace, *, stream: bool,
               include_usage: bool) -> Response:
        completion_id = f"chatcmpl-velo-{uuid.uuid4().hex[:24]}"
        self._finished(trace, completion_id)
        if stream:
            chunks = replay_chunks(completion_id=completion_id, model=chat.model, message=answer["message"],
                                   finish_reason=answer.get("finish_reason"), usage=answer.get("usage"),
                                   include_usage=include_usage)
            return StreamingResponse(replay(chunks), media_type="text/event-stream", headers=trace.headers())
        body = completion_from_message(completion_id=completion_id, model=chat.model, message=answer["message"],
                                       finish_reason=answer.get("finish_reason"), usage=answer.get("usage"))
        return JSONResponse(body, headers=trace.headers())

    async def _forward(self, chat: ChatCompletionRequest, payload: dict[str, Any], caller: Any, trace: Trace,
                       store_key: CacheKey | None, vector: np.ndarray | None, new_entry: str | None) -> Response:
        t0 = time.perf_counter()
        # finished: the upstream itself said "stop" (not litellm's normalised stand-in for nothing)
        data, finished = await self.services.upstream.complete_checked(payload, client_key=caller.client_key)
        self.metrics.upstream_latency.observe(time.perf_counter() - t0)
        choice = (data.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        trace.entry = None
        if store_key is not None and finished and not message.get("tool_calls") \
                and isinstance(message.get("content"), str):
            answer = {"message": {"role": "assistant", "content": message["content"]},
                      "finish_reason": "stop", "usage": data.get("usage")}
            trace.entry = new_entry
            self.services.spawn(self._store_answer(store_key, vector, answer, chat.model, new_entry))
        self._finished(trace, data.get("id"))
        return JSONResponse(data, headers=trace.headers())

    async def _forward_stream(self, chat: ChatCompletionRequest, payload: dict[str, Any], caller: Any,
                              trace: Trace, store_key: CacheKey | None, vector: np.ndarray | None,
                              new_entry: str | None) -> Response:
        t0 = time.perf_counter()
        chunks = await self.services.upstream.stream(payload, client_key=caller.client_key)
        trace.entry = new_entry  # the id the answer gets if the stream completes normally

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
            self._finished(trace, completion_id)
            # only a stream the upstream itself said was complete ("stop" and [DONE]) is cached
            if store_key is not None and assembler.cacheable and chunks.finished:
                answer = {"message": assembler.message(), "finish_reason": "stop", "usage": assembler.usage}
                self.services.spawn(self._store_answer(store_key, vector, answer, chat.model, new_entry))

        return StreamingResponse(relay(), media_type="text/event-stream", headers=trace.headers())

    def _finished(self, trace: Trace, completion_id: str | None) -> None:
        """Bookkeeping once the answer is complete: metrics, feedback registry, experience."""
        delay = time.perf_counter() - trace.started
        self.metrics.requests.labels(trace.action).inc()
        self.metrics.request_latency.labels(trace.action).observe(delay)
        served_entry = trace.entry if trace.action in ("A", "exact") else None
        if trace.action == "C" and trace.decision is not None and trace.decision.entry is not None:
            served_entry = trace.decision.entry.entry.id
        self.services.recent.add(Answered(trace.request_id, trace.action, served_entry, tenant=trace.tenant),
                                 completion_id)
        decision = trace.decision
        if self.services.experience is not None and decision is not None and decision.observation is not None:
            self.services.spawn(self._guarded("experience", lambda: self.services.experience.decision(
                request_id=trace.request_id, action=decision.action, probability=decision.probability,
                probs=decision.probs, explored=decision.explored, policy=trace.policy.version, delay_s=delay,
                entry=decision.entry.entry.id if decision.entry is not None else None,
                observation=decision.observation, observed_at=decision.observed_at), timeout_s=REDIS_TIMEOUT_S * 2))

    # ----- after the response -------------------------------------------------------------------
    async def _store_answer(self, key: CacheKey, vector: np.ndarray | None, answer: dict[str, Any], model: str,
                            entry_id: str | None) -> None:
        stored_id = None
        store = self.services.store
        if self.services.semantic_ready:
            if vector is None:
                vectors = await self._embed([key.question])
                vector = vectors[0] if vectors is not None else None
            if vector is not None:
                now = time.time()
                entry = CacheEntry(scope=key.scope, vector=np.asarray(vector, dtype=np.float32), question=key.question,
                                   answer=answer, model=model, expires_at=now + self.settings.cache_ttl_s,
                                   created_at=now, cache_value=INITIAL_VALUE, id=entry_id or uuid.uuid4().hex)
                added = await self._guarded("store", lambda: asyncio.to_thread(lambda: store.add([entry]) or True),
                                            timeout_s=max(1.0, self.settings.search_timeout_ms / 1000 * 5))
                if added:
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

    async def _shadow_check(self, payload: dict[str, Any], caller: Any, hit: Hit, request_id: str) -> None:
        """Ask the upstream the served question too; the answers' agreement is the reward of this
        decision, updates the entry's cache value (Eq. 5), and evicts an entry that fails."""
        try:
            fresh = await self.services.upstream.complete({**payload, "stream": False}, client_key=caller.client_key)
        except ProxyError as err:
            self.metrics.failures.labels("shadow", f"upstream_{err.status}").inc()
            return
        fresh_text = str(((fresh.get("choices") or [{}])[0].get("message") or {}).get("content") or "")
        cached_text = str(hit.entry.answer["message"].get("content") or "")
        vectors = await self._embed([fresh_text, cached_text])
        if vectors is None:
            return
        cosine, q = answer_agreement(vectors[0], vectors[1])
        self.metrics.shadow_checks.labels("pass" if cosine >= self.settings.shadow_fail_below else "fail").inc()
        await self._record_use(hit.entry.id, outcome=max(0.0, cosine))
        if cosine < self.settings.shadow_fail_below:
            log.info("shadow check failed for entry %s (agreement %.3f): evicted", hit.entry.id, cosine)
            store = self.services.store
            await self._guarded("store", lambda: asyncio.to_thread(store.delete, hit.entry.id), timeout_s=1.0)
        await self.log_reward(request_id, source="shadow", q=q, score=max(0.0, cosine))

    async def log_reward(self, request_id: str, *, source: str, q: float, score: float) -> bool:
        experience = self.services.experience
        if experience is None:
            return False
        async def reward() -> bool:
            await experience.reward(request_id=request_id, source=source, q=q, score=score)
            return True

        # None when it failed or was skipped (the breaker no longer opens on a single failure)
        return bool(await self._guarded("experience", reward, timeout_s=REDIS_TIMEOUT_S * 2))

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
            await self._record_use(answered.entry, outcome=score)
        # satisfaction on the paper's scale: -L2 between unit vectors spans [-2, 0]
        logged = await self.log_reward(answered.request_id, source="feedback", q=2.0 * (score - 1.0), score=score)
        return {"id": response_id, "request_id": answered.request_id, "action": answered.action,
                "entry": answered.entry, "recorded": True, "experience": logged}

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
