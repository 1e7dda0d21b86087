"""Long-lived components of one proxy process, created in the app's lifespan and closed there:
upstream, exact tier, embedder, store, verifier, Redis, the experience log, the guard every fail-open
call goes through, and the decision policy (whose life cycle, hot reload included, is
``velo_proxy.policy_manager``)."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable

import numpy as np

from velo_proxy.batching import MicroBatcher
from velo_proxy.exact import ExactTier, LocalExactTier, RedisExactTier
from velo_proxy.experience import ExperienceLog
from velo_proxy.labels import FileLabelStore, LabelStore, RedisLabelStore
from velo_proxy.live_guard import LiveGuard
from velo_proxy.metrics import Metrics
from velo_proxy.pipeline.guard import Breaker, Guard
from velo_proxy.policy_manager import PolicyManager
from velo_proxy.settings import Settings
from velo_proxy.store.base import CacheStore
from velo_proxy.upstream import Upstream

log = logging.getLogger("velo_proxy.services")
#: Use records written in one store transaction at most.
USE_BATCH = 512

__all__ = ["Answered", "Breaker", "RecentResponses", "Services"]


@dataclass(frozen=True, slots=True)
class Answered:
    """What feedback on a response needs to know."""

    request_id: str
    action: str
    entry: str | None
    tenant: str = ""


class RecentResponses:
    """The last N responses, for POST /v1/feedback, keyed by (tenant, id): the proxy-minted request
    id (``x-velo-request-id``) and the completion id. A tenant only ever finds its own responses, and
    a client-chosen ``x-request-id`` is never a key. An id that two of a tenant's responses share
    (an upstream that reuses completion ids) is forgotten rather than credited to the wrong one."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, str], Answered | None] = OrderedDict()

    def add(self, answered: Answered, *ids: str | None) -> None:
        if self.size <= 0:
            return
        for key in dict.fromkeys((answered.request_id, *ids)):
            if key:
                slot = (answered.tenant, key)
                known = self._items.get(slot, answered)
                self._items[slot] = answered if known is not None and known.request_id == answered.request_id \
                    else None
                self._items.move_to_end(slot)
        while len(self._items) > self.size * 2:
            self._items.popitem(last=False)

    def get(self, key: str, *, tenant: str) -> Answered | None:
        return self._items.get((tenant, key))


@dataclass
class Services:
    settings: Settings
    metrics: Metrics
    upstream: Upstream
    exact: ExactTier
    guard: Guard
    policies: PolicyManager
    embedder: Any = None  # velo_proxy.embedder.Embedder
    verifier: Any = None  # velo_proxy.verifier.PairVerifier
    store: CacheStore | None = None
    uses: MicroBatcher[tuple[str, float]] | None = None  # the store's use records, written in batches
    redis: Any = None  # redis.asyncio.Redis
    experience: ExperienceLog | None = None
    labels: LabelStore | None = None  # judged pairs (Redis stream, else JSONL in the data dir)
    live_guard: LiveGuard | None = None  # the live false-hit estimate and its serving floor
    recent: RecentResponses = field(default_factory=lambda: RecentResponses(0))
    load_errors: dict[str, str] = field(default_factory=dict)
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    @classmethod
    async def start(cls, *, settings: Settings, metrics: Metrics) -> "Services":
        upstream = Upstream(
            base_url=settings.upstream_base_url,
            api_key=settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None,
            model_map=settings.model_map,
            timeout_s=settings.upstream_timeout_s,
            max_retries=settings.upstream_max_retries,
            trusted_finish_providers=settings.trusted_finish_providers,
        )
        await upstream.start()
        redis_client = None
        if settings.redis_url:
            import redis.asyncio as aioredis

            redis_timeout_s = settings.redis_timeout_ms / 1000
            redis_client = aioredis.from_url(settings.redis_url, socket_timeout=redis_timeout_s,
                                             socket_connect_timeout=redis_timeout_s, decode_responses=True)
        exact: ExactTier = (RedisExactTier(redis_client) if redis_client is not None
                            else LocalExactTier(max_entries=settings.exact_cache_size))
        guard = Guard(breaker=Breaker(cooldown_s=settings.breaker_cooldown_s, threshold=settings.breaker_threshold),
                      metrics=metrics)
        load_errors: dict[str, str] = {}
        services = cls(settings=settings, metrics=metrics, upstream=upstream, exact=exact, guard=guard,
                       policies=PolicyManager(settings=settings, metrics=metrics, load_errors=load_errors),
                       redis=redis_client, recent=RecentResponses(settings.feedback_window), load_errors=load_errors)
        if redis_client is not None:
            services.experience = ExperienceLog(redis_client, agent_id=settings.agent_id,
                                                max_len=settings.experience_max_len)
        else:
            log.info("experience stream off (no VELO_REDIS_URL)")
        await services._start_loop()
        if settings.cache_enabled:
            await services._load_cache()
        services.policies.start(embedder=services.embedder, verifier=services.verifier)
        return services

    async def _start_loop(self) -> None:
        """The label store and the live guard, rebuilt from the newest stored judgements."""
        s = self.settings
        self.labels = (RedisLabelStore(self.redis, max_len=s.labels_max_len) if self.redis is not None
                       else FileLabelStore(s.data_dir / "judged" / "labels.jsonl", max_len=s.labels_max_len))
        self.live_guard = LiveGuard(max_false_hit_rate=s.max_false_hit_rate, window=s.guard_window,
                                    max_age_s=s.guard_max_age_s, min_scope_judgements=s.guard_min_scope_judgements,
                                    enabled=s.live_guard, metrics=self.metrics)
        try:
            loaded = self.live_guard.load(await self.labels.recent(4 * s.guard_window))
        except Exception as exc:  # noqa: BLE001 - Redis down at start: the guard starts empty
            self.load_errors["labels"] = f"{type(exc).__name__}: {exc}"
            log.error("could not read the stored judgements (%s): the live guard starts empty", exc)
            return
        if loaded:
            log.info("live guard rebuilt from %d stored judgements (%s)", loaded, self.labels.name)

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
            self.store = await asyncio.to_thread(open_store, self.settings, dim=self.embedder.dim,
                                                   embedder_id=self.embedder.id)
            self.uses = MicroBatcher(self._write_uses, max_items=USE_BATCH, wait_s=0.0, name="uses")
        except Exception as exc:  # noqa: BLE001
            self.load_errors["store"] = f"{type(exc).__name__}: {exc}"
            log.error("cache store unavailable, semantic cache off: %s", exc)
        s = self.settings
        judging = s.judge == "verifier" and (s.shadow_rate > 0 or s.near_miss_review_rate > 0)
        if s.policy != "threshold" or judging:  # the threshold policy does not verify, the verifier judge does
            self._load_verifier()

    def _load_verifier(self) -> None:
        """The pair verifier; without it no semantic hit is served (only exact repeats), and readiness says so."""
        from velo_proxy.verifier import PairVerifier

        try:
            verifier = PairVerifier(self.settings.verifier_dir, threads=self.settings.verifier_threads,
                                    batch_max=self.settings.verifier_batch_max,
                                    batch_wait_ms=self.settings.verifier_batch_wait_ms,
                                    embedder_id=self.embedder.id if self.embedder is not None else None)
        except Exception as exc:  # noqa: BLE001 - fail safe: no semantic hits
            self.load_errors["verifier"] = f"{type(exc).__name__}: {exc}"
            log.error("pair verifier unavailable, no semantic hits will be served: %s", exc)
            return
        if verifier.embedder_id and self.embedder is not None and verifier.embedder_id != self.embedder.id:
            # its cosine floor and calibration were measured with another embedder's similarities
            self.load_errors["verifier"] = (f"calibrated with embedder '{verifier.embedder_id}', "
                                            f"serving uses '{self.embedder.id}'")
            log.error("pair verifier refused: %s; no semantic hits will be served", self.load_errors["verifier"])
            verifier.close()
            return
        # a calibration whose thresholds hold no bound is a calibration (its verifier serves no semantic hit, its
        # scores are still the learned policy's features and the judge's verdicts); none at all is refused
        if "thresholds" not in verifier.calibration:
            self.load_errors["verifier"] = "the verifier carries no calibration"
            log.error("pair verifier refused: %s", self.load_errors["verifier"])
            verifier.close()
            return
        self.verifier = verifier

    # ----- lifecycle ----------------------------------------------------------------------------
    @property
    def semantic_ready(self) -> bool:
        return self.embedder is not None and self.store is not None

    def _write_uses(self, uses: list[tuple[str, float]]) -> Any:
        """The use records of concurrent requests (every cached answer served counts one), in one store
        write: while one batch is written, the next gathers (``MicroBatcher``)."""
        assert self.store is not None
        self.store.record_uses(uses)
        return np.zeros(len(uses))

    async def aclose(self) -> None:
        await self.policies.aclose()
        if self.background:
            await asyncio.wait(list(self.background), timeout=self.settings.shutdown_drain_s)
        if self.uses is not None:
            await self.uses.aclose()
        await self.upstream.aclose()
        if self.embedder is not None:
            await self.embedder.aclose()
        if self.verifier is not None:
            self.verifier.close()
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
        configured = self.upstream.base_url or self.upstream.model_map
        checks: dict[str, tuple[bool, str]] = {"upstream": (True, "configured" if configured else "not configured")}
        if self.settings.cache_enabled:
            checks["embedder"] = (self.embedder is not None, self.load_errors.get("embedder", "loaded"))
            checks["store"] = (self.store is not None, self.load_errors.get("store", "open"))
            if self.settings.policy != "threshold":
                checks["verifier"] = (self.verifier is not None,
                                      self.load_errors.get("verifier", f"loaded ({self.verifier.id})"
                                                           if self.verifier is not None else "not loaded"))
        checks["policy"] = (True, self.policies.current.version + (f" (fallback: {self.load_errors['policy']})"
                                                                   if "policy" in self.load_errors else ""))
        checks["experience"] = (True, f"on ({self.experience.key})" if self.experience else "off (no Redis)")
        if self.redis is not None:
            try:
                await asyncio.wait_for(self.redis.ping(), self.settings.redis_timeout_ms / 1000)
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
