"""The live false-hit estimate and the guard that tightens serving when it exceeds the bound.

Every judgement (``velo_proxy.judging.Label``) is a pair (score the decision saw, right or wrong): the
score is the verifier's for policies that verify, the cosine similarity for the threshold policy.
Per policy version, and per scope (tenant) once it has ``min_scope_judgements``, the guard keeps the
newest ``window`` judgements younger than ``max_age_s`` and derives:

- the live estimate: of the judged served hits (shadow checks), the share that was wrong and its
  one-sided 95 % upper bound (Wilson);
- the serving floor: the smallest score f such that the judged pairs at or above f either hold no
  wrong one or have an upper bound <= delta. Read retrospectively: the loosest extra threshold under
  which what was judged would have kept the bound. No wrong judgement, no floor: the guard acts on
  evidence of wrong hits, not on the absence of evidence. A floor above every possible score
  (a wrong hit at score 1) stops semantic serving for that policy or scope.

Near-miss reviews are judgements too, of candidates that were not served: they are what lets the
floor come down again while the guard keeps those candidates from being served (and old judgements
age out of the window). A request is served semantically only if its score reaches
the floor of its scope when the scope has ``min_scope_judgements`` of its own (so one tenant's traffic
never moves another's floor), else the floor of the policy. The state is rebuilt from the label store
at start. At most ``max_scopes`` scopes are tracked (the least recently judged is dropped).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from velo_proxy.calibration import wilson_upper
from velo_proxy.judging import Label

log = logging.getLogger("velo_proxy.guard")

NO_FLOOR = -math.inf
MAX_SCORE = 1.0  # verifier scores and cosine similarities never exceed it: a floor above means "off"


@dataclass(frozen=True, slots=True)
class Estimate:
    judged: int
    wrong: int

    @property
    def rate(self) -> float | None:
        return self.wrong / self.judged if self.judged else None

    @property
    def upper(self) -> float:
        return wilson_upper(self.wrong, self.judged)

    def to_json(self) -> dict[str, Any]:
        rate = self.rate
        return {"judged": self.judged, "wrong": self.wrong, "rate": None if rate is None else round(rate, 6),
                "upper_95": round(self.upper, 6)}


@dataclass(frozen=True, slots=True)
class _Judged:
    ts: float
    score: float
    correct: bool
    served: bool


def serving_floor(judged: Iterable[tuple[float, bool]], max_false_hit_rate: float) -> float:
    """The smallest score floor under which the judged (score, correct) pairs at or above it hold no
    wrong one or keep the 95 % upper bound <= ``max_false_hit_rate``; ``NO_FLOOR`` when no floor is
    needed. Candidate floors lie just above the score of a wrong judgement (ties go together)."""
    pairs = sorted(judged, key=lambda p: p[0])
    n, wrong = len(pairs), sum(1 for _, ok in pairs if not ok)
    if wrong == 0 or wilson_upper(wrong, n) <= max_false_hit_rate:
        return NO_FLOOR
    i = 0
    while i < len(pairs):  # drop the lowest scores, one tie group at a time
        score, wrong_here = pairs[i][0], 0
        while i < len(pairs) and pairs[i][0] == score:
            wrong_here += not pairs[i][1]
            i += 1
        n, wrong = len(pairs) - i, wrong - wrong_here
        if wrong_here and (wrong == 0 or wilson_upper(wrong, n) <= max_false_hit_rate):
            return math.nextafter(score, math.inf)
    return math.nextafter(pairs[-1][0], math.inf)  # not reached: past the last wrong one, none is left


class _Window:
    """The newest judgements of one policy (or scope), and apart from them the newest judged served
    hits: near-miss reviews, often the most numerous, must not push the served hits out of the live
    estimate."""

    def __init__(self, size: int) -> None:
        self.items: deque[_Judged] = deque(maxlen=size)
        self.served_items: deque[_Judged] = deque(maxlen=size)
        self.floor = NO_FLOOR

    def append(self, judged: _Judged) -> None:
        self.items.append(judged)
        if judged.served:
            self.served_items.append(judged)

    def prune(self, oldest: float) -> None:
        for items in (self.items, self.served_items):
            while items and items[0].ts < oldest:
                items.popleft()

    def served(self) -> Estimate:
        return Estimate(len(self.served_items), sum(1 for j in self.served_items if not j.correct))

    def at_floor(self) -> Estimate:
        kept = [j for j in self.items if j.score >= self.floor]
        return Estimate(len(kept), sum(1 for j in kept if not j.correct))


class LiveGuard:
    def __init__(self, *, max_false_hit_rate: float, window: int, max_age_s: float, min_scope_judgements: int,
                 enabled: bool = True, metrics: Any = None, clock: Callable[[], float] = time.time,
                 max_scopes: int = 10_000) -> None:
        self.max_false_hit_rate = max_false_hit_rate
        self.window = window
        self.max_age_s = max_age_s
        self.min_scope_judgements = min_scope_judgements
        self.enabled = enabled
        self.metrics = metrics
        self._clock = clock
        self.max_scopes = max_scopes
        self._windows: OrderedDict[tuple[str, str | None], _Window] = OrderedDict()
        self._lock = threading.Lock()

    # ----- judgements in ------------------------------------------------------------------------
    def observe(self, label: Label) -> None:
        judged = _Judged(label.ts, float(label.served_score), bool(label.correct), label.kind == "shadow")
        with self._lock:
            for key in ((label.policy, None), (label.policy, label.scope)):
                w = self._window(key)
                w.append(judged)
                self._update(key, w)
        self._export(label.policy)

    def load(self, labels: Iterable[Label]) -> int:
        """Rebuild from stored labels (oldest first), without logging each floor on the way."""
        count = 0
        with self._lock:
            for label in labels:
                judged = _Judged(label.ts, float(label.served_score), bool(label.correct), label.kind == "shadow")
                for key in ((label.policy, None), (label.policy, label.scope)):
                    self._window(key).append(judged)
                count += 1
            for key, w in self._windows.items():
                self._update(key, w, quiet=True)
        for policy in {p for p, _ in self._windows}:
            self._export(policy)
        return count

    def _window(self, key: tuple[str, str | None]) -> _Window:
        w = self._windows.get(key)
        if w is None:
            w = self._windows[key] = _Window(self.window)
            if len(self._windows) > self.max_scopes:
                oldest = next(k for k in self._windows if k[1] is not None)
                del self._windows[oldest]
        else:
            self._windows.move_to_end(key)
        return w

    def _update(self, key: tuple[str, str | None], w: _Window, *, quiet: bool = False) -> None:
        w.prune(self._clock() - self.max_age_s)
        new = serving_floor(((j.score, j.correct) for j in w.items), self.max_false_hit_rate)
        old, w.floor = w.floor, new
        policy, scope = key
        if new == old or quiet or (scope is not None and len(w.items) < self.min_scope_judgements):
            return  # a scope's floor counts (and is told) once the scope has a guard of its own
        direction = "tighten" if new > old else "relax"
        est = w.at_floor()
        log.warning("guard %s: policy %s%s: serving floor %s -> %s (%d judged at the floor, %d wrong, upper %.3f, "
                    "bound %.3f)", direction, policy, "" if scope is None else f" scope {scope}", _show(old),
                    _show(new), est.judged, est.wrong, est.upper, self.max_false_hit_rate)
        if self.metrics is not None:
            self.metrics.guard_changes.labels(direction, "policy" if scope is None else "scope").inc()

    def _age(self, key: tuple[str, str | None], w: _Window | None) -> None:
        """Let judgements age out even when no new one arrives. On the request path this costs one
        comparison; the floor is recomputed only when the window's oldest judgement has expired."""
        if w is not None and w.items and w.items[0].ts < self._clock() - self.max_age_s:
            with self._lock:
                self._update(key, w)

    # ----- serving ------------------------------------------------------------------------------
    def floor(self, policy: str, scope: str) -> float:
        """The score a semantic hit of ``policy`` in ``scope`` needs (``NO_FLOOR``: no extra bar)."""
        if not self.enabled:
            return NO_FLOOR
        # a scope with judgements enough is judged on its own (another tenant's traffic does not move
        # its floor); the others share the policy's
        s = self._windows.get((policy, scope))
        self._age((policy, scope), s)
        if s is not None and len(s.items) >= self.min_scope_judgements:
            return s.floor
        w = self._windows.get((policy, None))
        self._age((policy, None), w)
        return w.floor if w is not None else NO_FLOOR

    # ----- reporting ----------------------------------------------------------------------------
    def estimate(self, policy: str, scope: str | None = None) -> Estimate:
        w = self._windows.get((policy, scope))
        return w.served() if w is not None else Estimate(0, 0)

    def _export(self, policy: str) -> None:
        if self.metrics is None:
            return
        w = self._windows.get((policy, None))
        if w is None:
            return
        est = w.served()
        self.metrics.live_judged.labels(policy).set(est.judged)
        self.metrics.live_false_hit_rate.labels(policy).set(est.rate if est.rate is not None else float("nan"))
        self.metrics.live_false_hit_upper.labels(policy).set(est.upper)
        self.metrics.guard_floor.labels(policy).set(w.floor if self.enabled else NO_FLOOR)

    def stats(self) -> dict[str, Any]:
        for key, w in list(self._windows.items()):
            self._age(key, w)
        out: dict[str, Any] = {"enabled": self.enabled, "max_false_hit_rate": self.max_false_hit_rate,
                               "window": self.window, "policies": {}}
        with self._lock:
            for (policy, scope), w in sorted(self._windows.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
                entry = {"live": w.served().to_json(), "floor": _show(w.floor), "at_floor": w.at_floor().to_json(),
                         "judgements": len(w.items)}
                slot = out["policies"].setdefault(policy, {"scopes": {}})
                if scope is None:
                    slot.update(entry)
                else:
                    entry["own_guard"] = len(w.items) >= self.min_scope_judgements
                    slot["scopes"][scope] = entry
        return out


def _show(floor: float) -> float | str | None:
    if floor == NO_FLOOR:
        return None
    if floor > MAX_SCORE:
        return "off"
    return round(floor, 6)
