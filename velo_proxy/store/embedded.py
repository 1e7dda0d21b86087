"""The embedded cache store: SQLite (WAL) as the source of truth, per-scope in-memory vector indexes.

Layout under ``path``::

    store.sqlite3          entries (payload, bookkeeping and the float32 vector as a BLOB), WAL mode
    ann/<sha256(scope)>.usearch   optional snapshots of the HNSW index of large scopes (a cache, see below)

Durability: every ``add`` (and every delete, purge, eviction, ``record_use``) is one SQLite
transaction, so after a crash (kill -9) an entry is either complete or absent. ``synchronous=NORMAL``
is the default: in WAL mode a process crash loses nothing that was committed; only an OS crash or power
loss can lose the last transactions (never corrupt the database). Pass ``synchronous="FULL"`` to trade
write throughput for that too.

In memory, one ``_Scope`` per scope (scope is a hard filter: each scope has its own index, a search never
looks at another scope's vectors):

* a contiguous float32 matrix of the scope's (L2-normalised) vectors plus aligned numpy arrays of the
  bookkeeping the policy and eviction need (row id, created_at, expires_at, kind, use count, cache value);
  small scopes are searched exactly (one mat-vec, expired entries masked);
* once a scope holds more than ``ann_threshold`` entries, also a usearch HNSW index (inner product on
  int8-quantised vectors: small and fast to build); a search over-fetches candidates from it, drops the
  expired ones and re-ranks the rest exactly with the float32 matrix, so similarities are exact cosines.
  Below ``ann_threshold // 2`` entries the scope goes back to exact search.

Only the returned hits' payloads (question, answer JSON, model) are read from SQLite.

Rebuild on open: the bookkeeping and vectors are streamed from SQLite straight into the arrays (about
1.5 s for 100k entries). Building HNSW for a large scope is the slow part (about a minute for 100k
entries on two busy cores), so each large scope's index is snapshotted to ``ann/`` (atomically: temp
file + rename) on ``close()``, after each build, by ``checkpoint()`` and, when enough has changed, at the
end of ``evict()``. On open a snapshot is loaded and reconciled with SQLite by key set (SQLite row ids
are AUTOINCREMENT, never reused, and a row's vector never changes): rows missing from the snapshot are
added, keys no longer in SQLite are removed. A missing, unreadable or too stale snapshot is rebuilt in a
background thread (``build_threads``, one by default to leave a core to serving) while the scope is
searched exactly; the same happens when a scope grows past ``ann_threshold``. ``wait_for_indexes()``
waits for those builds. The snapshots are never trusted over SQLite.

One process per directory: a lock file (``LOCK``, flock) makes a second opener fail with a clear error
instead of silently diverging from the first one's in-memory indexes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from velo_proxy.cache_value import below_mean_mask, over_cap, update_cache_value
from velo_proxy.store.base import CacheEntry, CacheStore, EvictionReport, Hit, unit_vector

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    rid INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    scope TEXT NOT NULL,
    kind INTEGER NOT NULL,
    question TEXT NOT NULL,
    answer TEXT NOT NULL,
    model TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    use_count INTEGER NOT NULL,
    cache_value REAL NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_scope ON entries(scope);
"""

# HNSW parameters (measured on 2 cores with 384-d vectors; see benchmarks/store.py).
ANN_DTYPE = "i8"
ANN_CONNECTIVITY = 16
ANN_EXPANSION_ADD = 128
ANN_EXPANSION_SEARCH = 64


def _matvec(matrix: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``matrix @ q`` without BLAS: OpenBLAS threads its gemv for anything but tiny inputs, and on two
    busy cores its threads wait for each other (measured: 11 ms instead of 0.05 ms for 2000 x 384).
    einsum's single-threaded SIMD loop is predictable (0.13 ms for 2000 x 384, 0.7 ms for 10k)."""
    return np.einsum("ij,j->i", matrix, q)


def _fetch_count(limit: int) -> int:
    """Candidates taken from HNSW before filtering expired ones and exact re-ranking."""
    return max(4 * limit, limit + 32)


class _Scope:
    """Vectors and bookkeeping of one scope, in aligned arrays (row ``i`` = one entry)."""

    __slots__ = ("name", "dim", "n", "vecs", "rids", "created", "expires", "kind", "uses", "values",
                 "ids", "pos", "ann", "ann_dirty", "building")

    def __init__(self, name: str, dim: int, capacity: int = 16) -> None:
        self.name = name
        self.dim = dim
        self.n = 0
        capacity = max(16, int(capacity))
        self.vecs = np.empty((capacity, dim), dtype=np.float32)
        self.rids = np.empty(capacity, dtype=np.int64)
        self.created = np.empty(capacity, dtype=np.float64)
        self.expires = np.empty(capacity, dtype=np.float64)
        self.kind = np.empty(capacity, dtype=np.int8)
        self.uses = np.empty(capacity, dtype=np.int64)
        self.values = np.empty(capacity, dtype=np.float64)
        self.ids: list[str] = []
        self.pos: dict[int, int] = {}  # row id -> row in the arrays
        self.ann: Any = None  # usearch Index once the scope is large
        self.ann_dirty = 0  # mutations of ``ann`` since its last snapshot
        self.building = False  # a first HNSW build is running outside the store lock

    def _grow(self, needed: int) -> None:
        capacity = len(self.rids)
        if needed <= capacity:
            return
        new_cap = max(needed, capacity * 2)
        for name in ("vecs", "rids", "created", "expires", "kind", "uses", "values"):
            old = getattr(self, name)
            new = np.empty((new_cap,) + old.shape[1:], dtype=old.dtype)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)

    def append(self, rids: np.ndarray, ids: list[str], vecs: np.ndarray, created: np.ndarray,
               expires: np.ndarray, kind: np.ndarray, uses: np.ndarray, values: np.ndarray) -> None:
        k = len(rids)
        self._grow(self.n + k)
        s = slice(self.n, self.n + k)
        self.vecs[s] = vecs
        self.rids[s] = rids
        self.created[s] = created
        self.expires[s] = expires
        self.kind[s] = kind
        self.uses[s] = uses
        self.values[s] = values
        for i, rid in enumerate(rids.tolist()):
            self.pos[rid] = self.n + i
        self.ids.extend(ids)
        self.n += k

    def remove(self, rid: int) -> str:
        """Remove one row (swap with the last); returns the entry id. The ANN index is not touched."""
        i = self.pos.pop(rid)
        last = self.n - 1
        entry_id = self.ids[i]
        if i != last:
            for arr in (self.vecs, self.rids, self.created, self.expires, self.kind, self.uses, self.values):
                arr[i] = arr[last]
            self.ids[i] = self.ids[last]
            self.pos[int(self.rids[i])] = i
        self.ids.pop()
        self.n = last
        return entry_id


def _scope_file(scope: str) -> str:
    return hashlib.sha256(scope.encode("utf-8")).hexdigest()[:40] + ".usearch"


class EmbeddedStore(CacheStore):
    """In-process cache store persisted under a directory (see the module docstring)."""

    def __init__(self, path: Path | str, *, dim: int, ann_threshold: int = 4096,
                 synchronous: str = "NORMAL", ann_threads: int = 0, build_threads: int = 1,
                 ann_expansion_search: int = ANN_EXPANSION_SEARCH, embedder_id: str | None = None) -> None:
        if dim <= 0:
            raise ValueError("dim must be positive")
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"bad synchronous mode {synchronous!r}")
        self.dim = int(dim)
        # which model made the vectors (one store directory holds one vector space; recorded in meta and
        # checked on open: two 384-d models are not comparable)
        self.embedder_id = embedder_id
        self.path = Path(path)
        self.ann_threshold = max(1, int(ann_threshold))
        self._ann_threads = int(ann_threads)  # threads for bulk HNSW inserts under the lock (0: all cores)
        self._build_threads = int(build_threads)  # threads of background HNSW builds (leave a core to serving)
        self._builders: list[threading.Thread] = []
        self._ann_ef = int(ann_expansion_search)
        self._lock = threading.RLock()
        self._save_lock = threading.Lock()
        self._scopes: dict[str, _Scope] = {}
        self._by_id: dict[str, tuple[int, _Scope]] = {}  # entry id -> (row id, scope)
        self._count = 0
        self._closed = False

        self.path.mkdir(parents=True, exist_ok=True)
        self._ann_dir = self.path / "ann"
        self._ann_dir.mkdir(exist_ok=True)
        self._lock_fd: int | None = None
        self._acquire_dir_lock()
        try:
            self._conn = sqlite3.connect(self.path / "store.sqlite3", isolation_level=None,
                                         check_same_thread=False, cached_statements=256)
        except BaseException:
            self._release_dir_lock()
            raise
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._conn.executescript(_SCHEMA)
            self._check_meta()
            self.open_stats = self._load()
        except BaseException:
            self._conn.close()
            self._release_dir_lock()
            raise

    def _acquire_dir_lock(self) -> None:
        """One process per store directory: each keeps its own in-memory indexes, so a second writer
        would silently diverge. The lock dies with the process (kill -9 included)."""
        fd = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RuntimeError(f"cache store {self.path} is already open in another process (one process per "
                               "data directory: run one worker, or use Qdrant to share a cache)") from None
        self._lock_fd = fd

    def _release_dir_lock(self) -> None:
        if self._lock_fd is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self._lock_fd)
                self._lock_fd = None

    # ------------------------------------------------------------------ open / close

    def _check_meta(self) -> None:
        rows = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        if not rows:
            fresh = [("dim", str(self.dim)), ("schema", SCHEMA_VERSION)]
            if self.embedder_id:
                fresh.append(("embedder_id", self.embedder_id))
            with self._tx():
                self._conn.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", fresh)
            return
        if int(rows.get("dim", self.dim)) != self.dim:
            raise ValueError(f"store at {self.path} holds {rows['dim']}-d vectors, opened with dim={self.dim}: "
                             "use another data directory or the embedder it was built with")
        if rows.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise ValueError(f"store at {self.path} has schema {rows.get('schema')}, expected {SCHEMA_VERSION}")
        stored = rows.get("embedder_id")
        if self.embedder_id and stored and stored != self.embedder_id:
            raise ValueError(f"store at {self.path} holds vectors of embedder {stored!r}, opened with embedder "
                             f"{self.embedder_id!r}: use another data directory (VELO_DATA_DIR) or the embedder "
                             "it was built with")
        if self.embedder_id and not stored:
            # written before embedder ids were recorded, when all-MiniLM-L6-v2 was the only embedder
            log.warning("store at %s records no embedder; recording %r", self.path, self.embedder_id)
            with self._tx():
                self._conn.execute("INSERT INTO meta(key, value) VALUES ('embedder_id', ?)", (self.embedder_id,))

    def _load(self) -> dict[str, float]:
        """Read every entry's vector and bookkeeping (not the payloads) into the per-scope arrays."""
        t0 = time.perf_counter()
        self._conn.execute("BEGIN")  # one consistent snapshot for both queries
        try:
            counts = self._conn.execute("SELECT scope, count(*) FROM entries GROUP BY scope").fetchall()
            scopes = {name: _Scope(name, self.dim, capacity=int(c * 1.25) + 16) for name, c in counts}
            cols: dict[str, tuple[list, ...]] = {name: ([], [], [], [], [], [], []) for name in scopes}
            cur = self._conn.execute(
                "SELECT scope, rid, id, kind, created_at, expires_at, use_count, cache_value, vector FROM entries")
            for scope, rid, entry_id, kind, created, expires, uses, value, blob in cur:
                sc = scopes[scope]
                if len(blob) != self.dim * 4:
                    raise ValueError(f"store at {self.path}: entry {entry_id} has a vector of the wrong size")
                sc.vecs[sc.n] = np.frombuffer(blob, dtype=np.float32)  # straight into place: no big copies
                sc.n += 1
                c = cols[scope]
                c[0].append(rid), c[1].append(entry_id), c[2].append(kind), c[3].append(created)
                c[4].append(expires), c[5].append(uses), c[6].append(value)
        finally:
            self._conn.execute("COMMIT")
        t1 = time.perf_counter()
        for name, sc in scopes.items():
            rids, ids, kind, created, expires, uses, values = cols.pop(name)
            n = sc.n
            sc.rids[:n] = rids
            sc.kind[:n] = kind
            sc.created[:n] = created
            sc.expires[:n] = expires
            sc.uses[:n] = uses
            sc.values[:n] = values
            sc.ids = ids
            sc.pos = dict(zip(rids, range(n)))
            for entry_id, rid in zip(ids, rids):
                self._by_id[entry_id] = (rid, sc)
            self._count += n
            self._scopes[name] = sc
        t2 = time.perf_counter()
        wanted = set()
        for sc in self._scopes.values():
            if sc.n > self.ann_threshold:
                wanted.add(_scope_file(sc.name))
                self._open_ann(sc)
        for f in self._ann_dir.iterdir():  # stale snapshots and interrupted saves
            if f.name not in wanted:
                try:
                    f.unlink()
                except OSError:
                    pass
        t3 = time.perf_counter()
        return {"read_s": t1 - t0, "arrays_s": t2 - t1, "ann_s": t3 - t2, "total_s": t3 - t0}

    def _new_index(self) -> Any:
        from usearch.index import Index

        return Index(ndim=self.dim, metric="ip", dtype=ANN_DTYPE, connectivity=ANN_CONNECTIVITY,
                     expansion_add=ANN_EXPANSION_ADD, expansion_search=self._ann_ef)

    def _reconcile(self, sc: _Scope, index: Any) -> int:
        """Make ``index`` hold exactly the scope's current rows (by key set); returns the changes made."""
        have = np.asarray(index.keys, dtype=np.uint64)
        want = sc.rids[: sc.n].astype(np.uint64)
        extra = np.setdiff1d(have, want, assume_unique=True)
        missing = np.setdiff1d(want, have, assume_unique=True)
        if len(extra):
            index.remove(extra)
        if len(missing):
            rows = np.fromiter((sc.pos[int(k)] for k in missing), dtype=np.int64, count=len(missing))
            index.add(missing, sc.vecs[rows], threads=self._ann_threads)
        return len(extra) + len(missing)

    def _open_ann(self, sc: _Scope) -> None:
        """Load the scope's snapshot and reconcile it with SQLite, or build the index afresh."""
        from usearch.index import Index

        f = self._ann_dir / _scope_file(sc.name)
        index = None
        if f.exists():
            try:
                index = Index.restore(str(f))
            except Exception as exc:  # noqa: BLE001 - a bad snapshot is rebuilt, never trusted
                log.warning("ANN snapshot %s unreadable (%s): rebuilding", f, exc)
                index = None
            if index is not None and (index.ndim != self.dim or not str(index.dtype).lower().endswith(ANN_DTYPE)):
                index = None
        if index is not None:
            index.expansion_search = self._ann_ef
            have = np.asarray(index.keys, dtype=np.uint64)
            stale = len(np.setdiff1d(sc.rids[: sc.n].astype(np.uint64), have, assume_unique=True))
            if stale <= 1000:  # patch it now: well under a second
                sc.ann = index
                sc.ann_dirty = self._reconcile(sc, index)
                return
            if stale > sc.n // 2:  # cheaper to rebuild than to patch
                index = None
        self._start_build(sc, base=index)  # searches stay exact until the index is ready

    def _start_build(self, sc: _Scope, base: Any = None) -> None:
        """Build a scope's HNSW index (or patch ``base``, a stale snapshot) in a background thread;
        searches stay exact meanwhile."""
        if sc.building or sc.ann is not None:
            return
        sc.building = True
        t = threading.Thread(target=self._build, args=(sc, base), name="velo-ann-build", daemon=True)
        self._builders = [b for b in self._builders if b.is_alive()] + [t]
        t.start()

    def _build(self, sc: _Scope, base: Any = None) -> None:
        """Build without holding the store lock, then catch up with what changed meanwhile and install."""
        try:
            with self._lock:
                if self._closed or self._scopes.get(sc.name) is not sc:
                    return
                rids = sc.rids[: sc.n].astype(np.uint64)
                if base is None:
                    vecs = sc.vecs[: sc.n].copy()
                else:
                    todo = np.isin(rids, np.asarray(base.keys, dtype=np.uint64), invert=True)
                    rids, vecs = rids[todo], sc.vecs[: sc.n][todo]
            index = base if base is not None else self._new_index()
            if len(rids):
                index.add(rids, vecs, threads=self._build_threads)
            del vecs
            with self._lock:
                if self._closed or self._scopes.get(sc.name) is not sc or sc.n <= self.ann_threshold // 2:
                    return
                self._reconcile(sc, index)
                sc.ann = index
                sc.ann_dirty = sc.n + 1
        except Exception:  # noqa: BLE001 - the scope keeps working with exact search
            log.exception("building the ANN index of a scope failed; it stays on exact search")
            return
        finally:
            sc.building = False
        self.checkpoint(min_changes=1)  # so that the next open loads it instead of rebuilding

    def wait_for_indexes(self, timeout: float | None = None) -> bool:
        """Wait for background index builds (after open or when a scope grows past ``ann_threshold``);
        returns whether none is still running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in list(self._builders):
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._builders)

    def _save_ann(self, sc: _Scope, index: Any = None) -> None:
        """Snapshot a scope's index atomically (temp file + rename)."""
        index = index if index is not None else sc.ann
        if index is None:
            return
        f = self._ann_dir / _scope_file(sc.name)
        tmp = f.with_name(f.name + f".{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            index.save(str(tmp))
            os.replace(tmp, f)
        except Exception as exc:  # noqa: BLE001 - snapshots are an optimisation
            log.warning("could not snapshot ANN index of a scope to %s: %s", f, exc)
            try:
                tmp.unlink()
            except OSError:
                pass

    def checkpoint(self, *, min_changes: int = 1, min_share: float = 0.0) -> int:
        """Snapshot the HNSW index of every large scope with at least ``min_changes`` unsaved changes
        (and at least ``min_share`` of its size).

        The index is copied under the store lock and written to disk outside it, so searches are held
        up only by the copy. Returns how many snapshots were written.
        """
        if not self._save_lock.acquire(blocking=False):
            return 0  # another thread is saving
        try:
            todo = []
            with self._lock:
                if self._closed:
                    return 0
                for sc in self._scopes.values():
                    if sc.ann is not None and sc.ann_dirty >= max(min_changes, min_share * sc.n):
                        todo.append((sc, sc.ann.copy()))
                        sc.ann_dirty = 0
            for sc, snapshot in todo:
                self._save_ann(sc, snapshot)
            return len(todo)
        finally:
            self._save_lock.release()

    def close(self) -> None:
        with self._save_lock, self._lock:  # same order as checkpoint(): save lock first
            if self._closed:
                return
            for sc in self._scopes.values():
                if sc.ann is not None and sc.ann_dirty:
                    self._save_ann(sc)
                    sc.ann_dirty = 0
            self._closed = True
            self._conn.close()
            self._release_dir_lock()

    def __enter__(self) -> "EmbeddedStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("store is closed")

    # ------------------------------------------------------------------ helpers

    def _tx(self) -> "_Transaction":
        return _Transaction(self._conn)

    def _vector(self, v: Any) -> np.ndarray:
        return unit_vector(v, self.dim)

    def _payloads(self, rids: Sequence[int]) -> dict[int, tuple[str, str, str, str]]:
        if not rids:
            return {}
        marks = ",".join("?" * len(rids))
        rows = self._conn.execute(
            f"SELECT rid, id, question, answer, model FROM entries WHERE rid IN ({marks})", list(rids)).fetchall()
        return {r[0]: r[1:] for r in rows}

    def _entry(self, sc: _Scope, i: int, payload: tuple[str, str, str, str]) -> CacheEntry:
        entry_id, question, answer, model = payload
        return CacheEntry(scope=sc.name, vector=sc.vecs[i].copy(), question=question, answer=json.loads(answer),
                          model=model, expires_at=float(sc.expires[i]), kind=int(sc.kind[i]), id=entry_id,
                          created_at=float(sc.created[i]), use_count=int(sc.uses[i]),
                          cache_value=float(sc.values[i]))

    def _forget(self, victims: list[tuple[_Scope, int]]) -> None:
        """Remove rows (already deleted from SQLite) from memory and from the ANN indexes."""
        ann_keys: dict[str, tuple[_Scope, list[int]]] = {}
        for sc, rid in victims:
            if rid not in sc.pos:
                continue
            entry_id = sc.remove(rid)
            self._by_id.pop(entry_id, None)
            self._count -= 1
            if sc.ann is not None:
                ann_keys.setdefault(sc.name, (sc, []))[1].append(rid)
        for sc, keys in ann_keys.values():
            sc.ann.remove(np.asarray(keys, dtype=np.uint64))
            sc.ann_dirty += len(keys)
        for sc in {id(sc): sc for sc, _ in victims}.values():
            self._shrink(sc)

    def _shrink(self, sc: _Scope) -> None:
        if sc.n == 0:
            self._scopes.pop(sc.name, None)
        if sc.ann is not None and sc.n <= self.ann_threshold // 2:
            sc.ann = None
            sc.ann_dirty = 0
            try:
                (self._ann_dir / _scope_file(sc.name)).unlink()
            except OSError:
                pass

    def _delete_rows(self, victims: list[tuple[_Scope, int]]) -> int:
        if not victims:
            return 0
        with self._tx():
            self._conn.executemany("DELETE FROM entries WHERE rid = ?", [(rid,) for _, rid in victims])
        self._forget(victims)
        return len(victims)

    # ------------------------------------------------------------------ contract

    def add(self, entries: Sequence[CacheEntry]) -> None:
        if not entries:
            return
        # Validate everything before touching the database; an id given twice keeps its last version.
        last: dict[str, int] = {}
        for i, e in enumerate(entries):
            last[e.id] = i
        batch = []
        for i, e in enumerate(entries):
            if last[e.id] != i:
                continue
            if not isinstance(e.scope, str):
                raise TypeError("scope must be a str")
            answer = json.dumps(e.answer, ensure_ascii=False, separators=(",", ":"))
            batch.append((e, self._vector(e.vector), answer))
        with self._lock:
            self._check_open()
            rids = []
            with self._tx():
                for e, vec, answer in batch:
                    if e.id in self._by_id:
                        self._conn.execute("DELETE FROM entries WHERE id = ?", (e.id,))
                    cur = self._conn.execute(
                        "INSERT INTO entries(id, scope, kind, question, answer, model, created_at, expires_at, "
                        "use_count, cache_value, vector) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        (e.id, e.scope, int(e.kind), e.question, answer, e.model, float(e.created_at),
                         float(e.expires_at), int(e.use_count), float(e.cache_value), vec.tobytes()))
                    rids.append(cur.lastrowid)
            # Committed: mirror in memory.
            replaced = [self._by_id[e.id] for e, _, _ in batch if e.id in self._by_id]
            if replaced:
                self._forget([(sc, rid) for rid, sc in replaced])
            per_scope: dict[str, list[int]] = {}
            for j, (e, _, _) in enumerate(batch):
                per_scope.setdefault(e.scope, []).append(j)
            for scope, js in per_scope.items():
                sc = self._scopes.get(scope)
                if sc is None:
                    sc = self._scopes[scope] = _Scope(scope, self.dim)
                es = [batch[j][0] for j in js]
                rid_arr = np.asarray([rids[j] for j in js], dtype=np.int64)
                vecs = np.stack([batch[j][1] for j in js])
                sc.append(rid_arr, [e.id for e in es], vecs,
                          np.asarray([e.created_at for e in es], dtype=np.float64),
                          np.asarray([e.expires_at for e in es], dtype=np.float64),
                          np.asarray([e.kind for e in es], dtype=np.int8),
                          np.asarray([e.use_count for e in es], dtype=np.int64),
                          np.asarray([e.cache_value for e in es], dtype=np.float64))
                for e, rid in zip(es, rid_arr.tolist()):
                    self._by_id[e.id] = (rid, sc)
                self._count += len(es)
                if sc.ann is not None:
                    sc.ann.add(rid_arr.astype(np.uint64), vecs, threads=1 if len(es) < 64 else self._ann_threads)
                    sc.ann_dirty += len(es)
                elif sc.n > self.ann_threshold and not sc.building:
                    self._start_build(sc)  # seconds for a few thousand entries: not under the lock

    def search(self, scope: str, vector: np.ndarray, *, limit: int, now: float | None = None) -> list[Hit]:
        q = self._vector(vector)
        if now is None:
            now = time.time()
        with self._lock:
            self._check_open()
            sc = self._scopes.get(scope)
            if sc is None or limit <= 0 or sc.n == 0:
                return []
            rows, sims = None, None
            if sc.ann is not None:
                rows, sims = self._search_ann(sc, q, limit, now)
            if rows is None:
                rows, sims = self._search_exact(sc, q, limit, now)
            if len(rows) == 0:
                return []
            rids = sc.rids[rows].tolist()
            payloads = self._payloads(rids)
            hits = []
            for i, rid, s in zip(rows.tolist(), rids, sims.tolist()):
                p = payloads.get(rid)
                if p is not None:
                    hits.append(Hit(entry=self._entry(sc, i, p), similarity=float(s)))
            return hits

    @staticmethod
    def _top(sims: np.ndarray, k: int) -> np.ndarray:
        if k < len(sims):
            part = np.argpartition(-sims, k - 1)[:k]
        else:
            part = np.arange(len(sims))
        return part[np.argsort(-sims[part], kind="stable")]

    def _search_exact(self, sc: _Scope, q: np.ndarray, limit: int, now: float) -> tuple[np.ndarray, np.ndarray]:
        n = sc.n
        sims = _matvec(sc.vecs[:n], q)
        valid = sc.expires[:n] > now
        n_valid = int(np.count_nonzero(valid))
        if n_valid == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        if n_valid < n:
            sims = np.where(valid, sims, -np.inf).astype(np.float32)
        order = self._top(sims, min(limit, n_valid))
        return order, sims[order]

    def _search_ann(self, sc: _Scope, q: np.ndarray, limit: int, now: float):
        fetch = min(sc.n, _fetch_count(limit))
        ef = max(self._ann_ef, fetch)
        if sc.ann.expansion_search != ef:
            sc.ann.expansion_search = ef
        matches = sc.ann.search(q, fetch, threads=1)
        pos = sc.pos
        rows = np.fromiter((pos.get(int(k), -1) for k in matches.keys), dtype=np.int64, count=len(matches.keys))
        rows = rows[rows >= 0]
        rows = rows[sc.expires[rows] > now]
        if len(rows) < limit and len(matches.keys) >= fetch:
            # Too many candidates were expired: fall back to an exact scan (rare: eviction drops them).
            return None, None
        sims = _matvec(sc.vecs[rows], q)
        order = self._top(sims, min(limit, len(rows)))
        return rows[order], sims[order]

    cheap_contains = True

    def contains(self, entry_id: str) -> bool:
        # a dict membership test is atomic under the GIL: no lock, so it never waits behind a write
        return entry_id in self._by_id

    def get(self, entry_id: str) -> CacheEntry | None:
        with self._lock:
            self._check_open()
            found = self._by_id.get(entry_id)
            if found is None:
                return None
            rid, sc = found
            p = self._payloads([rid]).get(rid)
            return None if p is None else self._entry(sc, sc.pos[rid], p)

    def record_use(self, entry_id: str, *, outcome: float = 1.0) -> CacheEntry | None:
        with self._lock:
            self._check_open()
            found = self._by_id.get(entry_id)
            if found is None:
                return None
            rid, sc = found
            i = sc.pos[rid]
            value, uses = update_cache_value(float(sc.values[i]), int(sc.uses[i]), outcome)
            with self._tx():
                self._conn.execute("UPDATE entries SET use_count = ?, cache_value = ? WHERE rid = ?",
                                   (uses, value, rid))
            sc.uses[i] = uses
            sc.values[i] = value
            p = self._payloads([rid]).get(rid)
            return None if p is None else self._entry(sc, i, p)

    def record_uses(self, uses: Sequence[tuple[str, float]]) -> None:
        # One lock, one transaction and one UPDATE statement for a batch. One transaction per use could not
        # keep up with exact hits (~1,300/s on 2 cores); executemany releases and re-takes the GIL for
        # every row, and under load each re-take can wait a whole switch interval for the event loop.
        with self._lock:
            self._check_open()
            rows: dict[int, tuple[int, float]] = {}  # rid -> (use count, cache value) after the batch
            for entry_id, outcome in uses:
                found = self._by_id.get(entry_id)
                if found is None:
                    continue
                rid, sc = found
                i = sc.pos[rid]
                value, count = update_cache_value(float(sc.values[i]), int(sc.uses[i]), outcome)
                sc.uses[i] = count
                sc.values[i] = value
                rows[int(rid)] = (count, value)
            if rows:
                values = ",".join("(?,?,?)" for _ in rows)
                params = [x for rid, (count, value) in rows.items() for x in (rid, count, value)]
                with self._tx():
                    self._conn.execute(
                        f"UPDATE entries SET use_count = v.column2, cache_value = v.column3 "  # noqa: S608 - placeholders only
                        f"FROM (VALUES {values}) AS v WHERE entries.rid = v.column1", params)

    def delete(self, entry_id: str) -> bool:
        with self._lock:
            self._check_open()
            found = self._by_id.get(entry_id)
            if found is None:
                return False
            rid, sc = found
            self._delete_rows([(sc, rid)])
            return True

    def purge_scope(self, scope: str) -> int:
        with self._lock:
            self._check_open()
            with self._tx():
                count = self._conn.execute("DELETE FROM entries WHERE scope = ?", (scope,)).rowcount
            sc = self._scopes.pop(scope, None)
            if sc is not None:
                for entry_id in sc.ids:
                    self._by_id.pop(entry_id, None)
                self._count -= sc.n
                sc.ann = None
                try:
                    (self._ann_dir / _scope_file(scope)).unlink()
                except OSError:
                    pass
            return count

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._check_open()
            return {"entries": self._count, "scopes": {name: sc.n for name, sc in self._scopes.items() if sc.n}}

    def _all(self) -> tuple[list[_Scope], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every entry as (scopes, scope index, row id, cache value, created_at) arrays."""
        scopes = [sc for sc in self._scopes.values() if sc.n]
        if not scopes:
            empty = np.empty(0)
            return scopes, empty.astype(np.int64), empty.astype(np.int64), empty, empty
        which = np.concatenate([np.full(sc.n, j, dtype=np.int64) for j, sc in enumerate(scopes)])
        rids = np.concatenate([sc.rids[: sc.n] for sc in scopes])
        values = np.concatenate([sc.values[: sc.n] for sc in scopes])
        created = np.concatenate([sc.created[: sc.n] for sc in scopes])
        return scopes, which, rids, values, created

    def evict(self, *, now: float | None = None, max_entries_per_scope: int | None = None,
              below_mean: bool = False, grace_s: float = 0.0) -> EvictionReport:
        if now is None:
            now = time.time()
        report = EvictionReport()
        with self._lock:
            self._check_open()
            # 1. expired
            victims = []
            for sc in list(self._scopes.values()):
                dead = sc.rids[: sc.n][sc.expires[: sc.n] <= now]
                victims.extend((sc, int(r)) for r in dead)
            report.expired = self._delete_rows(victims)
            # 2. size cap of each scope: its own lowest cache value first, then oldest
            cap = max_entries_per_scope
            if cap is not None and any(sc.n > cap for sc in self._scopes.values()):
                scopes, which, rids, values, created = self._all()
                drop = over_cap(values, created, cap=cap, groups=which)
                report.over_size = self._delete_rows([(scopes[int(which[i])], int(rids[i])) for i in drop])
            # 3. the paper's rule: below the mean cache value of its own scope, past the grace period
            if below_mean and self._count:
                scopes, which, rids, values, created = self._all()
                mask = below_mean_mask(values, now - created, grace_s=grace_s, groups=which)
                idx = np.flatnonzero(mask)
                report.below_mean = self._delete_rows([(scopes[int(which[i])], int(rids[i])) for i in idx])
        # Snapshot indexes that changed a lot since their last snapshot (outside the lock).
        if not self._closed:
            self.checkpoint(min_changes=1024, min_share=0.1)
        return report

    def __len__(self) -> int:
        with self._lock:
            return self._count


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error) on an autocommit connection."""

    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
