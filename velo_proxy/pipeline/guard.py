"""Fail open, in one place. The cache is an optimisation: every call to a component the proxy can
do without (embedder, store, verifier, exact tier, experience stream, policy) goes through ``Guard``,
which gives it a deadline (from the settings: ``Deadlines``), skips it while its circuit breaker is
open, and turns any failure into ``None`` plus a metric (``velo_component_failures_total``) and a log
line. The caller then carries on as if the component were not there: usually, forward upstream."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

from velo_proxy.metrics import Metrics
from velo_proxy.settings import Settings

log = logging.getLogger("velo_proxy.engine")
T = TypeVar("T")


class Breaker:
    """Per-component circuit breaker, shared by every request of the process.

    It opens for a cool-down after ``threshold`` consecutive failures of a component, not after one:
    a single request whose own input makes a component fail (or overrun its deadline) must not switch
    the cache off for every other client. Any success closes it again. After the cool-down one
    failure re-opens it at once (half-open); a success resets the count."""

    def __init__(self, cooldown_s: float = 5.0, threshold: int = 3) -> None:
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
class Deadlines:
    """Seconds each kind of guarded call may take (the ``VELO_*_TIMEOUT_*`` settings)."""

    embed: float
    search: float
    verify: float
    exact: float
    experience: float
    store_write: float
    eviction: float

    @classmethod
    def from_settings(cls, settings: Settings) -> "Deadlines":
        return cls(embed=settings.embed_timeout_ms / 1000, search=settings.search_timeout_ms / 1000,
                   verify=settings.verifier_timeout_ms / 1000, exact=settings.exact_timeout_ms / 1000,
                   experience=settings.experience_timeout_ms / 1000,
                   store_write=settings.store_write_timeout_ms / 1000, eviction=settings.eviction_timeout_s)


class Guard:
    """Deadline + breaker + failure metric + log line around every fail-open call."""

    def __init__(self, *, breaker: Breaker, metrics: Metrics) -> None:
        self.breaker = breaker
        self.metrics = metrics

    async def call(self, component: str, call: Callable[[], Awaitable[T]], *, deadline_s: float,
                   bookkeeping: bool = False) -> T | None:
        """``await call()`` within ``deadline_s``; None when the breaker is open, the deadline passes
        or the call raises (counted towards the breaker). A ``bookkeeping`` call (background work no
        request waits for: use counts) is counted and logged when it fails but moves the breaker neither
        way: a slow use record must not switch off the request path's searches."""
        if not self._allowed(component):
            return None
        try:
            result = await asyncio.wait_for(call(), deadline_s)
        except asyncio.TimeoutError:
            self.failed(component, "timeout", trip=not bookkeeping)
            return None
        except Exception as exc:  # noqa: BLE001 - the cache never fails a request
            self.failed(component, type(exc).__name__, exc, trip=not bookkeeping)
            return None
        if not bookkeeping:
            self.breaker.succeeded(component)
        return result

    def run(self, component: str, call: Callable[[], T], *, probe: bool = False) -> T | None:
        """``call()`` on the event loop, for in-process work too quick to need a deadline (the policy's
        decision). A ``probe`` is a cheap in-memory check that runs even while the breaker is open and
        whose success says nothing of the component's health: it never closes the breaker (a failure
        still counts)."""
        if not probe and not self._allowed(component):
            return None
        try:
            result = call()
        except Exception as exc:  # noqa: BLE001
            self.failed(component, type(exc).__name__, exc)
            return None
        if not probe:
            self.breaker.succeeded(component)
        return result

    def failed(self, component: str, reason: str, exc: BaseException | None = None, *, trip: bool = True) -> None:
        self.metrics.failures.labels(component, reason).inc()
        if trip:
            self.breaker.trip(component)
        log.warning("%s failed (%s), failing open%s", component, reason, f": {exc}" if exc else "")

    def _allowed(self, component: str) -> bool:
        if self.breaker.allows(component):
            return True
        self.metrics.failures.labels(component, "breaker_open").inc()
        return False
