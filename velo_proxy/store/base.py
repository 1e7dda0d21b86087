"""The cache-store contract shared by the embedded and the Qdrant back-ends.

A store holds cache entries: one vector each (the question's or the answer's: ``kind``, the paper's
c^k), a scope that every search filters on (hard isolation: a search never returns another scope's
entry), the question text, the answer payload, and the bookkeeping the policy and eviction use
(use count c^f, cache value c^r, timestamps). Methods are synchronous and thread-safe; the proxy calls
them from worker threads under a deadline.
"""

from __future__ import annotations

import abc
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

KIND_QUESTION = 0
KIND_ANSWER = 1


def new_entry_id() -> str:
    return uuid.uuid4().hex


def unit_vector(v: Any, dim: int) -> np.ndarray:
    """``v`` as a float32 unit vector of ``dim`` dimensions; ValueError for a wrong size, zero or non-finite."""
    arr = np.asarray(v, dtype=np.float32).reshape(-1)
    if arr.shape[0] != dim:
        raise ValueError(f"vector has {arr.shape[0]} dimensions, store has {dim}")
    norm = float(np.linalg.norm(arr))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("vector must be finite and non-zero")
    return np.ascontiguousarray(arr if abs(norm - 1.0) <= 1e-6 else arr / norm)


@dataclass(slots=True)
class CacheEntry:
    scope: str
    vector: np.ndarray  # float32 [D], L2-normalised
    question: str
    answer: dict[str, Any]  # {"message": {...}, "finish_reason": str, "usage": {...} | None}
    model: str
    expires_at: float
    kind: int = KIND_QUESTION
    id: str = field(default_factory=new_entry_id)
    created_at: float = field(default_factory=time.time)
    use_count: int = 0  # c^f
    cache_value: float = 0.0  # c^r, see velo_proxy.cache_value


@dataclass(slots=True)
class Hit:
    entry: CacheEntry
    similarity: float  # cosine similarity in [-1, 1]


@dataclass(slots=True)
class EvictionReport:
    expired: int = 0
    over_size: int = 0
    below_mean: int = 0

    @property
    def total(self) -> int:
        return self.expired + self.over_size + self.below_mean


class CacheStore(abc.ABC):
    """Interface of a cache back-end. ``dim`` is the vector dimension it was opened with."""

    dim: int

    @abc.abstractmethod
    def add(self, entries: Sequence[CacheEntry]) -> None:
        """Insert entries atomically: after a crash either all of them are there or none."""

    @abc.abstractmethod
    def search(self, scope: str, vector: np.ndarray, *, limit: int, now: float | None = None) -> list[Hit]:
        """Top-``limit`` unexpired entries of ``scope`` by cosine similarity, best first, vectors included."""

    @abc.abstractmethod
    def get(self, entry_id: str) -> CacheEntry | None: ...

    #: True when ``contains`` is an in-memory lookup cheap enough to call on the event loop.
    cheap_contains: bool = False

    def contains(self, entry_id: str) -> bool:
        """Whether the entry exists (the exact tier checks this on every hit)."""
        return self.get(entry_id) is not None

    @abc.abstractmethod
    def record_use(self, entry_id: str, *, outcome: float = 1.0) -> CacheEntry | None:
        """Count one use of an entry and fold ``outcome`` (in [0, 1]) into its cache value (Eq. 5)."""

    def record_uses(self, uses: Sequence[tuple[str, float]]) -> None:
        """``record_use`` for each ``(entry_id, outcome)`` in order (a store may write them at once)."""
        for entry_id, outcome in uses:
            self.record_use(entry_id, outcome=outcome)

    @abc.abstractmethod
    def delete(self, entry_id: str) -> bool: ...

    @abc.abstractmethod
    def purge_scope(self, scope: str) -> int:
        """Delete every entry of a scope; returns how many."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """``{"entries": int, "scopes": {scope: count}}``."""

    @abc.abstractmethod
    def evict(self, *, now: float | None = None, max_entries_per_scope: int | None = None,
              below_mean: bool = False, grace_s: float = 0.0) -> EvictionReport:
        """Drop expired entries, then in each scope holding more than ``max_entries_per_scope`` its own
        lowest-value entries (then oldest) beyond that many, then (if ``below_mean``) entries older
        than ``grace_s`` whose cache value is below the mean of their own scope. Both rules stay inside
        a scope: one tenant's entries, however many or valuable, never push out another tenant's."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    def close(self) -> None:  # noqa: B027 - optional for back-ends with nothing to release
        """Release files and connections."""
