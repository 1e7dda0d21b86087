"""Long-lived components of one proxy process, created in the app's lifespan and closed there:
upstream, exact tier, embedder, store, Redis, the decision policy (with hot reload from the policy
directory) and the experience log."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable

from velo_proxy.exact import ExactTier, LocalExactTier, RedisExactTier
from velo_proxy.experience import ExperienceLog
from velo_proxy.metrics import Metrics
from velo_proxy.policy import (LearnedPolicy, Policy, PolicyDirectory, PolicyMismatch, ThresholdPolicy, VerifiedPolicy,
                               default_policy_path)
from velo_proxy.settings import Settings
from velo_proxy.store.base import CacheStore
from velo_proxy.upstream import Upstream
from velo_proxy.verifier import VerifyRule

log = logging.getLogger("velo_proxy.services")

BREAKER_COOLDOWN_S = 5.0  # once open, skip a component this long instead of paying its timeout again
BREAKER_THRESHOLD = 3  # consecutive failures that open the breaker: one bad request does not
REDIS_TIMEOUT_S = 0.25


class Breaker:
    """Per-component circuit breaker, shared by every request of the process.

    It opens for a cool-down after ``threshold`` consecutive failures of a component, not after one:
    a single request whose own input makes a component fail (or overrun its deadline) must not switch
    the cache off for every other client. Any success closes it again. After the cool-down one
    failure re-opens it at once (half-open); a success resets the count."""

    def __init__(self, cooldown_s: float = BREAKER_COOLDOWN_S, threshold: int = BREAKER_THRESHOLD) -> None:
        self.cooldown_s = cooldown_s
        self.threshold = max(1, int(threshold))
        self._open_until: dict[str, float] = {}
        self._failures: dict[str, int] = {}

    def allows(self, component: str) -> bool:
        return time.monotonic() >= self._open_until.get(component, 0.0)

    def trip(self, component: str) -> None:
        """Count one failure; open the breaker once ``threshold`` of them came in a row."""
        failures = self._failures.get(component, 0) + 1
        self._failures[component] = failures
        if failures >= self.threshold:
            self._open_until[component] = time.monotonic() + self.cooldown_s

    def succeeded(self, component: str) -> None:
        if self._failures.pop(component, None) is not None:
            self._open_until.pop(component, None)


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
    policy: Policy
    embedder: Any = None  # velo_proxy.embedder.Embedder
    verifier: Any = None  # velo_proxy.verifier.PairVerifier
    store: CacheStore | None = None
    redis: Any = None  # redis.asyncio.Redis
    experience: ExperienceLog | None = None
    recent: RecentResponses = field(default_factory=lambda: RecentResponses(0))
    load_errors: dict[str, str] = field(default_factory=dict)
    breaker: Breaker = field(default_factory=Breaker)
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    rejected_versions: set[str] = field(default_factory=set)
    _watcher: asyncio.Task[Any] | None = None

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
                       policy=ThresholdPolicy(threshold=settings.similarity_threshold, top_p=settings.top_p_hits),
                       redis=redis_client, recent=RecentResponses(settings.feedback_window))
        if redis_client is not None:
            services.experience = ExperienceLog(redis_client, agent_id=settings.agent_id,
                                                max_len=settings.experience_max_len)
        else:
            log.info("experience stream off (no VELO_REDIS_URL)")
        if settings.cache_enabled:
            await services._load_cache()
            if settings.policy == "verified":
                services.policy = services.verified_policy()
            if services.embedder is not None and settings.policy == "learned":
                services._load_initial_policy()
        services._show_policy()
        if settings.policy_dir is not None and services.embedder is not None and settings.policy == "learned":
            services._watcher = asyncio.create_task(services._watch_policy_dir())
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
        if self.settings.policy != "threshold":
            self._load_verifier()

    def _load_verifier(self) -> None:
        """The pair verifier; without it no semantic hit is served (only exact repeats), and readiness says so."""
        from velo_proxy.verifier import PairVerifier

        try:
            verifier = PairVerifier(self.settings.verifier_dir, threads=self.settings.verifier_threads)
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
        if not verifier.calibration.get("thresholds"):
            self.load_errors["verifier"] = "the verifier carries no calibration"
            log.error("pair verifier refused: %s", self.load_errors["verifier"])
            verifier.close()
            return
        self.verifier = verifier

    def verify_rule(self):
        """The serving rule for the operator's bound, or None without a verifier."""
        return self.verifier.rule(self.settings.max_false_hit_rate) if self.verifier is not None else None

    def verified_policy(self) -> VerifiedPolicy:
        rule = self.verify_rule()
        version = f"verified-{self.verifier.id}" if self.verifier is not None else "verified-unavailable"
        if rule is not None and rule.threshold == float("inf"):
            log.warning("no verifier threshold is calibrated for a false-hit bound of %g: no semantic hits",
                        self.settings.max_false_hit_rate)
        return VerifiedPolicy(rule=rule, version=version, top_p=self.settings.top_p_hits)

    # ----- policy -------------------------------------------------------------------------------
    def load_policy(self, path: Any, *, version: str | None = None) -> LearnedPolicy:
        rule = None
        if self.settings.verify_learned:
            # without a verifier the rule is "never passes" (threshold inf): no unverified A
            rule = self.verify_rule() or VerifyRule(cosine_floor=1.01, top_k=0, threshold=float("inf"))
        return LearnedPolicy(path, embedder_id=self.embedder.id, dim=self.embedder.dim,
                             max_false_hit_rate=self.settings.max_false_hit_rate,
                             exploration_rate=self.settings.exploration_rate, version=version, verify_rule=rule)

    def _load_initial_policy(self) -> None:
        """An explicitly configured policy must load (a mismatch stops the proxy with the reason);
        otherwise the newest published version, then the shipped default, then the threshold policy."""
        if self.settings.policy_path is not None:
            self.policy = self.load_policy(self.settings.policy_path)
            return
        if self.settings.policy_dir is not None:
            pointer = PolicyDirectory(self.settings.policy_dir).current()
            if pointer is not None:
                try:
                    self.policy = self.load_policy(pointer["path"], version=pointer["version"])
                    return
                except PolicyMismatch as exc:
                    self.rejected_versions.add(pointer["version"])
                    log.error("published policy %s refused: %s", pointer["version"], exc)
        try:
            self.policy = self.load_policy(default_policy_path())
        except PolicyMismatch as exc:
            self.load_errors["policy"] = str(exc)
            log.warning("shipped policy not usable (%s); using the threshold policy", exc)

    def _show_policy(self) -> None:
        self.metrics.policy_version.clear()
        self.metrics.policy_version.labels(self.policy.version).set(1)

    async def _watch_policy_dir(self) -> None:
        directory = PolicyDirectory(self.settings.policy_dir)
        while True:
            await asyncio.sleep(self.settings.policy_reload_s)
            try:
                await self.reload_policy(directory)
            except Exception:  # noqa: BLE001 - the watcher must survive anything
                log.exception("policy reload failed")

    async def reload_policy(self, directory: PolicyDirectory) -> bool:
        """Swap in the published version if it is new and valid; in-flight requests keep the policy
        object they started with. Returns whether the policy changed."""
        pointer = await asyncio.to_thread(directory.current)
        if pointer is None or pointer["version"] == self.policy.version or pointer["version"] in self.rejected_versions:
            return False
        try:
            candidate = await asyncio.to_thread(lambda: self.load_policy(pointer["path"], version=pointer["version"]))
        except PolicyMismatch as exc:
            self.rejected_versions.add(pointer["version"])
            self.metrics.failures.labels("policy", "rejected").inc()
            log.error("policy %s refused, keeping %s: %s", pointer["version"], self.policy.version, exc)
            return False
        previous, self.policy = self.policy, candidate
        self.metrics.policy_reloads.inc()
        self._show_policy()
        log.info("policy %s -> %s", previous.version, candidate.version)
        return True

    # ----- lifecycle ----------------------------------------------------------------------------
    @property
    def semantic_ready(self) -> bool:
        return self.embedder is not None and self.store is not None

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self.background:
            await asyncio.wait(list(self.background), timeout=5.0)
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
        checks["policy"] = (True, self.policy.version + (f" (fallback: {self.load_errors['policy']})"
                                                         if "policy" in self.load_errors else ""))
        checks["experience"] = (True, f"on ({self.experience.key})" if self.experience else "off (no Redis)")
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
