"""The Qdrant cache store: the same contract on a Qdrant server (or qdrant-client's ``:memory:`` mode).

One collection (cosine distance) holds every scope; each point's payload carries the scope, the
bookkeeping and the payload. Every search filters ``scope == X`` and ``expires_at > now`` inside the
query (a hard filter evaluated by Qdrant, never post-filtering), with a keyword payload index on
``scope`` (``is_tenant``: Qdrant co-locates a tenant's points) and a float index on ``expires_at``.

Point ids are UUID strings: ``CacheEntry.id`` is a uuid hex, so the point id is the same UUID; any other
id is mapped through uuid5 and the original id is kept in the payload (``entry_id``).

``record_use`` is a read-modify-write under a process-local lock: concurrent uses from several proxy
processes may lose an increment (the cache value is a heuristic, not an account).
Qdrant applies one upsert request as one operation of its write-ahead log, so a batch ``add`` is
applied whole or not at all when the server crashes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from typing import Any, Sequence

import numpy as np

from velo_proxy.cache_value import below_mean_mask, over_cap, update_cache_value
from velo_proxy.store.base import CacheEntry, CacheStore, EvictionReport, Hit, unit_vector

log = logging.getLogger(__name__)
_ID_NAMESPACE = uuid.UUID("6f1c1f2e-6a55-4f0e-9b7e-1c2d3e4f5a6b")
_SCROLL_PAGE = 1024
_DELETE_CHUNK = 1024


def _point_id(entry_id: str) -> str:
    try:
        return str(uuid.UUID(hex=entry_id))
    except (ValueError, AttributeError, TypeError):
        return str(uuid.uuid5(_ID_NAMESPACE, str(entry_id)))


class QdrantStore(CacheStore):
    """Cache store on Qdrant (see the module docstring)."""

    def __init__(self, url: str, *, dim: int, collection: str = "velo_cache", api_key: str | None = None,
                 timeout: int | None = None, embedder_id: str | None = None) -> None:
        from qdrant_client import QdrantClient, models

        self._m = models
        self.dim = int(dim)
        # which model made the vectors: the collection's metadata says it, every point carries it, and a
        # collection built by another embedder is refused (same dimension is not the same vector space)
        self.embedder_id = embedder_id
        self.collection = collection
        self._lock = threading.RLock()
        self._local = url == ":memory:"
        # Local mode is plain Python over dicts, not safe for concurrent readers and writers: serialise it.
        self._read_guard = self._lock if self._local else contextlib.nullcontext()
        if self._local:
            self._client = QdrantClient(location=":memory:")
        else:
            kwargs: dict[str, Any] = {"url": url, "api_key": api_key}
            if timeout is not None:
                kwargs["timeout"] = timeout
            self._client = QdrantClient(**kwargs)
        self._ensure_collection()

    def _ensure_collection(self) -> None:
        m = self._m
        c = self._client
        meta = {"embedder_id": self.embedder_id} if self.embedder_id else None
        if not c.collection_exists(self.collection):
            c.create_collection(self.collection, metadata=meta,
                                vectors_config=m.VectorParams(size=self.dim, distance=m.Distance.COSINE))
        else:
            info = c.get_collection(self.collection)
            vectors = info.config.params.vectors
            size = getattr(vectors, "size", None)
            if size is not None and size != self.dim:
                raise ValueError(f"Qdrant collection {self.collection!r} holds {size}-d vectors, "
                                 f"opened with dim={self.dim}")
            stored = (getattr(info.config, "metadata", None) or {}).get("embedder_id")
            if self.embedder_id and stored and stored != self.embedder_id:
                raise ValueError(f"Qdrant collection {self.collection!r} holds vectors of embedder {stored!r}, "
                                 f"opened with embedder {self.embedder_id!r}: use another collection "
                                 "(VELO_QDRANT_COLLECTION) or the embedder it was built with")
            if self.embedder_id and not stored:
                # built before embedder ids were recorded (only all-MiniLM-L6-v2 existed then) or by a
                # server without collection metadata: record it from now on
                log.warning("Qdrant collection %r records no embedder; recording %r", self.collection,
                            self.embedder_id)
                try:
                    c.update_collection(self.collection, metadata=meta)
                except Exception as exc:  # noqa: BLE001 - servers before 1.16 have no collection metadata
                    log.warning("could not record the embedder in Qdrant collection %r: %s", self.collection, exc)
        if self._local:
            return  # local mode has no payload indexes (and warns when asked for one)
        try:
            c.create_payload_index(self.collection, "scope",
                                   field_schema=m.KeywordIndexParams(type=m.KeywordIndexType.KEYWORD, is_tenant=True))
            c.create_payload_index(self.collection, "expires_at", field_schema=m.PayloadSchemaType.FLOAT)
        except Exception:  # noqa: BLE001 - already there, or local mode (which has no payload indexes)
            pass

    # ------------------------------------------------------------------ helpers

    def _vector(self, v: Any) -> np.ndarray:
        return unit_vector(v, self.dim)

    def _scope_filter(self, scope: str, now: float | None = None) -> Any:
        m = self._m
        must = [m.FieldCondition(key="scope", match=m.MatchValue(value=scope))]
        if now is not None:
            must.append(m.FieldCondition(key="expires_at", range=m.Range(gt=now)))
        return m.Filter(must=must)

    @staticmethod
    def _entry(point: Any) -> CacheEntry:
        p = point.payload
        vector = point.vector
        if isinstance(vector, dict):  # named vectors: take the default one
            vector = vector.get("", next(iter(vector.values())))
        return CacheEntry(scope=p["scope"], vector=np.asarray(vector, dtype=np.float32), question=p["question"],
                          answer=p["answer"], model=p["model"], expires_at=float(p["expires_at"]),
                          kind=int(p["kind"]), id=p["entry_id"], created_at=float(p["created_at"]),
                          use_count=int(p["use_count"]), cache_value=float(p["cache_value"]))

    def _retrieve(self, entry_id: str) -> Any | None:
        points = self._client.retrieve(self.collection, [_point_id(entry_id)], with_payload=True, with_vectors=True)
        return points[0] if points else None

    def _scroll(self, fields: list[str], flt: Any = None):
        offset = None
        while True:
            points, offset = self._client.scroll(self.collection, scroll_filter=flt, limit=_SCROLL_PAGE,
                                                 offset=offset, with_payload=fields, with_vectors=False)
            yield from points
            if offset is None:
                break

    def _delete_ids(self, ids: Sequence[Any]) -> int:
        for i in range(0, len(ids), _DELETE_CHUNK):
            self._client.delete(self.collection, points_selector=self._m.PointIdsList(points=list(ids[i:i + _DELETE_CHUNK])),
                                wait=True)
        return len(ids)

    # ------------------------------------------------------------------ contract

    def add(self, entries: Sequence[CacheEntry]) -> None:
        if not entries:
            return
        m = self._m
        points = {}
        for e in entries:  # an id given twice keeps its last version
            points[_point_id(e.id)] = m.PointStruct(
                id=_point_id(e.id), vector=self._vector(e.vector).tolist(),
                payload={"entry_id": e.id, "scope": e.scope, "kind": int(e.kind), "question": e.question,
                         "answer": e.answer, "model": e.model, "created_at": float(e.created_at),
                         "expires_at": float(e.expires_at), "use_count": int(e.use_count),
                         "cache_value": float(e.cache_value), "embedder_id": self.embedder_id})
        with self._lock:
            self._client.upsert(self.collection, points=list(points.values()), wait=True)

    def search(self, scope: str, vector: np.ndarray, *, limit: int, now: float | None = None) -> list[Hit]:
        if limit <= 0:
            return []
        q = self._vector(vector)
        if now is None:
            now = time.time()
        with self._read_guard:
            res = self._client.query_points(self.collection, query=q.tolist(),
                                            query_filter=self._scope_filter(scope, now),
                                            limit=limit, with_payload=True, with_vectors=True)
        return [Hit(entry=self._entry(p), similarity=float(p.score)) for p in res.points]

    def get(self, entry_id: str) -> CacheEntry | None:
        with self._read_guard:
            point = self._retrieve(entry_id)
        return None if point is None else self._entry(point)

    def record_use(self, entry_id: str, *, outcome: float = 1.0) -> CacheEntry | None:
        with self._lock:
            point = self._retrieve(entry_id)
            if point is None:
                return None
            entry = self._entry(point)
            entry.cache_value, entry.use_count = update_cache_value(entry.cache_value, entry.use_count, outcome)
            self._client.set_payload(self.collection, payload={"use_count": entry.use_count,
                                                               "cache_value": entry.cache_value},
                                     points=[point.id], wait=True)
            return entry

    def delete(self, entry_id: str) -> bool:
        with self._lock:
            pid = _point_id(entry_id)
            if not self._client.retrieve(self.collection, [pid], with_payload=False, with_vectors=False):
                return False
            self._delete_ids([pid])
            return True

    def purge_scope(self, scope: str) -> int:
        m = self._m
        with self._lock:
            flt = self._scope_filter(scope)
            count = self._client.count(self.collection, count_filter=flt, exact=True).count
            if count:
                self._client.delete(self.collection, points_selector=m.FilterSelector(filter=flt), wait=True)
            return count

    def stats(self) -> dict[str, Any]:
        scopes: dict[str, int] = {}
        with self._read_guard:
            for p in self._scroll(["scope"]):
                scope = p.payload["scope"]
                scopes[scope] = scopes.get(scope, 0) + 1
        return {"entries": sum(scopes.values()), "scopes": scopes}

    def evict(self, *, now: float | None = None, max_entries_per_scope: int | None = None,
              below_mean: bool = False, grace_s: float = 0.0) -> EvictionReport:
        m = self._m
        if now is None:
            now = time.time()
        report = EvictionReport()
        with self._lock:
            # 1. expired (a filtered delete, evaluated by Qdrant)
            expired = m.Filter(must=[m.FieldCondition(key="expires_at", range=m.Range(lte=now))])
            report.expired = self._client.count(self.collection, count_filter=expired, exact=True).count
            if report.expired:
                self._client.delete(self.collection, points_selector=m.FilterSelector(filter=expired), wait=True)
            cap = max_entries_per_scope
            # no scope can be over the cap while the whole collection is within it
            if (cap is None or len(self) <= cap) and not below_mean:
                return report
            points = list(self._scroll(["cache_value", "created_at", "scope"]))
            ids = [p.id for p in points]
            values = np.asarray([float(p.payload["cache_value"]) for p in points], dtype=np.float64)
            created = np.asarray([float(p.payload["created_at"]) for p in points], dtype=np.float64)
            scopes = np.asarray([str(p.payload["scope"]) for p in points], dtype=object)
            keep = np.ones(len(ids), dtype=bool)
            # 2. size cap of each scope: its own lowest cache value first, then oldest
            if cap is not None and len(ids) > cap:
                drop = over_cap(values, created, cap=cap, groups=scopes)
                keep[drop] = False
                report.over_size = self._delete_ids([ids[i] for i in drop])
            # 3. below the mean cache value of its own scope, past the grace period
            if below_mean and keep.any():
                rest = np.flatnonzero(keep)
                mask = below_mean_mask(values[rest], now - created[rest], grace_s=grace_s, groups=scopes[rest])
                report.below_mean = self._delete_ids([ids[i] for i in rest[mask]])
        return report

    def __len__(self) -> int:
        with self._read_guard:
            return int(self._client.count(self.collection, exact=True).count)

    def close(self) -> None:
        try:
            self._client.close()
        except Exception:  # noqa: BLE001
            pass
