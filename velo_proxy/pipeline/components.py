"""The cache's components as the request path calls them: every call through the one ``Guard``
with its deadline, and a missing, slow, failing or switched-off component answers None (or False),
never an exception. Latency metrics are observed here, once per call kind."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Sequence

import numpy as np

from velo_proxy.metrics import Metrics
from velo_proxy.pipeline.guard import Deadlines, Guard
from velo_proxy.scope import CacheKey
from velo_proxy.services import Services
from velo_proxy.store.base import CacheEntry, EvictionReport, Hit


class CacheComponents:
    def __init__(self, *, services: Services, guard: Guard, deadlines: Deadlines, metrics: Metrics) -> None:
        self.services = services
        self.guard = guard
        self.deadlines = deadlines
        self.metrics = metrics

    @property
    def semantic_ready(self) -> bool:
        return self.services.semantic_ready

    # ----- embedder, store, verifier ------------------------------------------------------------
    async def embed(self, texts: list[str]) -> np.ndarray | None:
        embedder = self.services.embedder
        t0 = time.perf_counter()
        vectors = await self.guard.call("embedder", lambda: embedder.embed(texts), deadline_s=self.deadlines.embed)
        if vectors is not None:
            self.metrics.embed_latency.observe(time.perf_counter() - t0)
        return vectors

    async def search(self, scope: str, vector: np.ndarray, *, limit: int) -> list[Hit] | None:
        store = self.services.store
        t0 = time.perf_counter()
        hits = await self.guard.call("store", lambda: asyncio.to_thread(store.search, scope, vector, limit=limit),
                                     deadline_s=self.deadlines.search)
        if hits is not None:
            self.metrics.search_latency.observe(time.perf_counter() - t0)
        return hits

    async def verify(self, question: str, candidates: Sequence[str]) -> list[float] | None:
        """The verifier's scores of (question, candidate) pairs in one batched call; None when the
        verifier is missing, slow or failing."""
        verifier = self.services.verifier
        if verifier is None:
            return None
        t0 = time.perf_counter()
        scores = await self.guard.call("verifier", lambda: verifier.score(question, list(candidates)),
                                       deadline_s=self.deadlines.verify)
        if scores is None:
            return None
        self.metrics.verifier_latency.observe(time.perf_counter() - t0)
        self.metrics.verifier_pairs.inc(len(candidates))
        return [float(s) for s in scores]

    async def contains(self, entry_id: str) -> bool:
        """Whether the store still has the entry; True when it cannot say (a closed or broken store:
        the exact copy is served rather than nothing)."""
        store = self.services.store
        if store is None:
            return True
        if store.cheap_contains:
            found = self.guard.run("store", lambda: store.contains(entry_id), probe=True)
        else:
            found = await self.guard.call("store", lambda: asyncio.to_thread(store.contains, entry_id),
                                          deadline_s=self.deadlines.search)
        return found is not False

    async def add(self, entry: CacheEntry) -> bool:
        store = self.services.store
        added = await self.guard.call("store", lambda: asyncio.to_thread(lambda: store.add([entry]) or True),
                                      deadline_s=self.deadlines.store_write)
        return bool(added)

    async def record_use(self, entry_id: str, *, outcome: float = 1.0) -> None:
        """One use of an entry, written with the concurrent requests' uses in one batch."""
        uses = self.services.uses
        if self.services.store is not None and uses is not None:
            await self.guard.call("store", lambda: uses.submit([(entry_id, outcome)]),
                                  deadline_s=self.deadlines.store_write, bookkeeping=True)

    async def delete(self, entry_id: str) -> None:
        store = self.services.store
        if store is not None:
            await self.guard.call("store", lambda: asyncio.to_thread(store.delete, entry_id),
                                  deadline_s=self.deadlines.store_write)

    async def evict(self, *, max_entries_per_scope: int, grace_s: float) -> EvictionReport | None:
        store = self.services.store
        if store is None:
            return None
        return await self.guard.call("store", lambda: asyncio.to_thread(
            store.evict, now=time.time(), max_entries_per_scope=max_entries_per_scope, below_mean=True,
            grace_s=grace_s), deadline_s=self.deadlines.eviction)

    # ----- exact tier -----------------------------------------------------------------------------
    async def exact_get(self, key: CacheKey) -> dict[str, Any] | None:
        return await self.guard.call("exact", lambda: self.services.exact.get(key.scope, key.exact),
                                     deadline_s=self.deadlines.exact)

    async def exact_set(self, key: CacheKey, entry_id: str | None, answer: dict[str, Any], *, ttl_s: float,
                        via: dict[str, Any] | None = None) -> None:
        """``via``: for the copy of a semantic hit, what it was served on (policy, score, similarity,
        verifier score), so that the live guard's floor still applies to its repeats."""
        value = {"entry": entry_id, "answer": answer, **({"via": via} if via else {})}
        await self.guard.call("exact", lambda: self.services.exact.set(key.scope, key.exact, value, ttl_s=ttl_s),
                              deadline_s=self.deadlines.exact)

    # ----- experience stream ------------------------------------------------------------------------
    async def log_decision(self, **fields: Any) -> None:
        experience = self.services.experience
        if experience is not None:
            await self.guard.call("experience", lambda: experience.decision(**fields),
                                  deadline_s=self.deadlines.experience)

    async def log_reward(self, request_id: str, *, source: str, q: float, score: float) -> bool:
        """Whether the reward reached the stream (False without one, or when the append failed)."""
        experience = self.services.experience
        if experience is None:
            return False

        async def reward() -> bool:
            await experience.reward(request_id=request_id, source=source, q=q, score=score)
            return True

        return bool(await self.guard.call("experience", reward, deadline_s=self.deadlines.experience))
