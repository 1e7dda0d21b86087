"""One conformance suite for both cache back-ends (embedded and Qdrant ``:memory:``), plus the
embedded store's own guarantees: persistence, crash safety (kill -9 mid-write) and the ANN path."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from velo_proxy.cache_value import INITIAL_VALUE, update_cache_value
from velo_proxy.store import CacheEntry, CacheStore, EvictionReport, open_store
from velo_proxy.store.embedded import EmbeddedStore
from velo_proxy.store.qdrant import QdrantStore

DIM = 384
T0 = time.time()
HOUR = 3600.0


def unit(rng: np.random.Generator, n: int | None = None) -> np.ndarray:
    v = rng.standard_normal((n or 1, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v if n is not None else v[0]


def make(scope: str, vector: np.ndarray, i: int = 0, **kw) -> CacheEntry:
    kw.setdefault("expires_at", T0 + 10 * HOUR)
    return CacheEntry(scope=scope, vector=vector, question=f"question {i}",
                      answer={"message": {"role": "assistant", "content": f"answer {i} é"}, "finish_reason": "stop",
                              "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}},
                      model="gpt-test", **kw)


@pytest.fixture(params=["embedded", "qdrant"])
def store(request, tmp_path):
    s: CacheStore
    if request.param == "embedded":
        s = EmbeddedStore(tmp_path / "store", dim=DIM)
    else:
        s = QdrantStore(":memory:", dim=DIM, collection=f"t{uuid.uuid4().hex[:8]}")
    yield s
    s.close()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---------------------------------------------------------------------------------------- both

def test_search_order_and_similarity_match_numpy(store, rng):
    vecs = unit(rng, 300)
    entries = [make("s", v, i, kind=i % 2) for i, v in enumerate(vecs)]
    store.add(entries[:150])
    store.add(entries[150:])
    for q in unit(rng, 5):
        sims = vecs @ q
        expected = np.argsort(-sims)[:10]
        hits = store.search("s", q, limit=10, now=T0)
        assert [h.entry.id for h in hits] == [entries[i].id for i in expected]
        np.testing.assert_allclose([h.similarity for h in hits], sims[expected], atol=1e-5)
        assert all(a.similarity >= b.similarity for a, b in zip(hits, hits[1:]))
    # A stored vector finds itself first, with its payload and bookkeeping intact.
    e = entries[42]
    top = store.search("s", e.vector, limit=1, now=T0)[0]
    assert top.entry.id == e.id and top.similarity == pytest.approx(1.0, abs=1e-5)
    got = top.entry
    np.testing.assert_allclose(got.vector, e.vector, atol=1e-6)
    assert got.vector.dtype == np.float32 and got.vector.shape == (DIM,)
    assert (got.scope, got.question, got.answer, got.model, got.kind) == (e.scope, e.question, e.answer, e.model, e.kind)
    assert got.created_at == pytest.approx(e.created_at) and got.expires_at == pytest.approx(e.expires_at)
    assert (got.use_count, got.cache_value) == (0, INITIAL_VALUE)


def test_limit_larger_than_scope_and_unknown_scope(store, rng):
    vecs = unit(rng, 3)
    store.add([make("s", v, i) for i, v in enumerate(vecs)])
    assert len(store.search("s", vecs[0], limit=10, now=T0)) == 3
    assert store.search("nope", vecs[0], limit=10, now=T0) == []


def test_scope_is_a_hard_filter(store, rng):
    q = unit(rng)
    far = unit(rng, 20)
    # Scope b holds the query vector itself and near copies; scope a only unrelated vectors.
    store.add([make("b", q, 0)] + [make("b", (q + 0.01 * v) / np.linalg.norm(q + 0.01 * v), i + 1)
                                   for i, v in enumerate(far)])
    a_entries = [make("a", v, i) for i, v in enumerate(far)]
    store.add(a_entries)
    hits = store.search("a", q, limit=50, now=T0)
    assert len(hits) == 20
    assert {h.entry.scope for h in hits} == {"a"}
    assert {h.entry.id for h in hits} == {e.id for e in a_entries}
    assert max(h.similarity for h in hits) < 0.5
    assert store.search("b", q, limit=1, now=T0)[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert store.search("a ", q, limit=5, now=T0) == []  # no prefix/normalisation games


def test_expired_entries_are_not_returned(store, rng):
    q = unit(rng)
    expired = make("s", q, 0, expires_at=T0 - 1)
    later = make("s", q, 1, expires_at=T0 + 60)
    fresh = [make("s", v, i + 2) for i, v in enumerate(unit(rng, 5))]
    store.add([expired, later] + fresh)
    ids = [h.entry.id for h in store.search("s", q, limit=10, now=T0)]
    assert expired.id not in ids and ids[0] == later.id and len(ids) == 6
    ids = [h.entry.id for h in store.search("s", q, limit=10, now=T0 + 120)]
    assert later.id not in ids and len(ids) == 5
    assert store.search("s", q, limit=10, now=T0 + 100 * HOUR) == []


def test_get(store, rng):
    e = make("s", unit(rng), 7, kind=1, use_count=3, cache_value=0.25)
    store.add([e])
    got = store.get(e.id)
    assert got is not None and got.id == e.id
    assert (got.scope, got.question, got.answer, got.model, got.kind, got.use_count) == \
        (e.scope, e.question, e.answer, e.model, 1, 3)
    assert got.cache_value == pytest.approx(0.25)
    np.testing.assert_allclose(got.vector, e.vector, atol=1e-6)
    assert store.get(uuid.uuid4().hex) is None


def test_add_same_id_replaces(store, rng):
    v1, v2 = unit(rng, 2)
    e = make("s", v1, 1)
    store.add([e])
    e2 = make("s", v2, 2, id=e.id)
    store.add([e2])
    assert len(store) == 1
    assert store.get(e.id).question == "question 2"
    hits = store.search("s", v2, limit=5, now=T0)
    assert [h.entry.id for h in hits] == [e.id] and hits[0].similarity == pytest.approx(1.0, abs=1e-5)


def test_add_rejects_wrong_dimension(store, rng):
    with pytest.raises(ValueError):
        store.add([make("s", np.ones(DIM + 1, dtype=np.float32), 0)])
    assert len(store) == 0


def test_record_use_follows_eq5(store, rng):
    e = make("s", unit(rng), 0)
    other = make("s", unit(rng), 1)
    store.add([e, other])
    value, count = INITIAL_VALUE, 0
    for outcome in (1.0, 0.0, 0.5, 1.7, -3.0, 1.0):
        value, count = update_cache_value(value, count, outcome)
        got = store.record_use(e.id, outcome=outcome)
        assert got is not None and got.use_count == count
        assert got.cache_value == pytest.approx(value, abs=1e-9)
    stored = store.get(e.id)
    assert (stored.use_count, stored.cache_value) == (count, pytest.approx(value, abs=1e-9))
    hit = store.search("s", e.vector, limit=1, now=T0)[0]
    assert (hit.entry.use_count, hit.entry.cache_value) == (count, pytest.approx(value, abs=1e-9))
    assert store.get(other.id).use_count == 0  # only the used entry changed
    assert store.record_use(uuid.uuid4().hex) is None


def test_record_uses_writes_a_batch_in_order(store, rng):
    """The request path writes concurrent uses in one batch: the same values as one by one, in order,
    unknown ids skipped."""
    a, b = make("s", unit(rng), 0), make("s", unit(rng), 1)
    store.add([a, b])
    uses = [(a.id, 1.0), (b.id, 0.0), (uuid.uuid4().hex, 1.0), (a.id, 0.0), (a.id, 0.5)]
    store.record_uses(uses)
    for entry, outcomes in ((a, (1.0, 0.0, 0.5)), (b, (0.0,))):
        value, count = INITIAL_VALUE, 0
        for outcome in outcomes:
            value, count = update_cache_value(value, count, outcome)
        got = store.get(entry.id)
        assert (got.use_count, got.cache_value) == (count, pytest.approx(value, abs=1e-9))
    store.record_uses([])  # nothing to write


def test_delete(store, rng):
    vecs = unit(rng, 4)
    entries = [make("s", v, i) for i, v in enumerate(vecs)]
    store.add(entries)
    assert store.delete(entries[1].id) is True
    assert store.delete(entries[1].id) is False
    assert store.get(entries[1].id) is None
    assert store.contains(entries[0].id) and not store.contains(entries[1].id) and not store.contains("never-added")
    assert len(store) == 3
    ids = [h.entry.id for h in store.search("s", vecs[1], limit=10, now=T0)]
    assert entries[1].id not in ids and len(ids) == 3


def test_purge_scope_and_stats(store, rng):
    store.add([make("a", v, i) for i, v in enumerate(unit(rng, 7))])
    store.add([make("b", v, i) for i, v in enumerate(unit(rng, 3))])
    assert store.stats() == {"entries": 10, "scopes": {"a": 7, "b": 3}}
    assert store.purge_scope("a") == 7
    assert store.purge_scope("a") == 0
    assert store.purge_scope("zzz") == 0
    assert store.stats() == {"entries": 3, "scopes": {"b": 3}}
    assert len(store) == 3
    assert store.search("a", unit(rng), limit=5, now=T0) == []
    assert len(store.search("b", unit(rng), limit=5, now=T0)) == 3


def test_evict_ttl(store, rng):
    dead = [make("s", v, i, expires_at=T0 - 10) for i, v in enumerate(unit(rng, 4))]
    alive = [make("t", v, i, expires_at=T0 + 10) for i, v in enumerate(unit(rng, 3))]
    store.add(dead + alive)
    report = store.evict(now=T0)
    assert isinstance(report, EvictionReport)
    assert (report.expired, report.over_size, report.below_mean, report.total) == (4, 0, 0, 4)
    assert len(store) == 3 and all(store.get(e.id) is None for e in dead)
    assert store.stats() == {"entries": 3, "scopes": {"t": 3}}
    assert store.evict(now=T0 + 20).expired == 3
    assert len(store) == 0


def test_evict_size_cap_drops_lowest_value_then_oldest(store, rng):
    values = [0.9, 0.1, 0.5, 0.1, 0.7, 0.3]
    created = [T0 - 50, T0 - 10, T0 - 40, T0 - 20, T0 - 30, T0 - 60]
    entries = [make("s", v, i, cache_value=values[i], created_at=created[i]) for i, v in enumerate(unit(rng, 6))]
    store.add(entries)
    report = store.evict(now=T0, max_entries_per_scope=3)
    assert (report.expired, report.over_size, report.below_mean) == (0, 3, 0)
    # Dropped: the two 0.1s (both) and 0.3; kept 0.5, 0.7, 0.9.
    assert {e.id for e in entries if store.get(e.id)} == {entries[0].id, entries[2].id, entries[4].id}
    # Ties in value go oldest first.
    store.add([make("s", v, 10 + i, cache_value=0.0, created_at=T0 - 100 + i) for i, v in enumerate(unit(rng, 2))])
    newest = make("s", unit(rng), 20, cache_value=0.0, created_at=T0 - 1)
    store.add([newest])
    assert store.evict(now=T0, max_entries_per_scope=4).over_size == 2
    assert store.get(newest.id) is not None and len(store) == 4
    assert store.evict(now=T0, max_entries_per_scope=10).total == 0


def test_size_cap_is_per_scope_one_tenant_cannot_push_out_another(store, rng):
    """Tenant B filling its scope far past the cap evicts only B's own lowest-valued entries; tenant
    A's entries, valued lower than all of B's, stay."""
    cap = 5
    tenant_a = [make("tenant-a", v, i, cache_value=0.0, created_at=T0 - 1000) for i, v in enumerate(unit(rng, 3))]
    store.add(tenant_a)
    tenant_b = [make("tenant-b", v, 100 + i, cache_value=0.5 + i / 100, created_at=T0 - i)
                for i, v in enumerate(unit(rng, 4 * cap))]
    store.add(tenant_b)
    report = store.evict(now=T0, max_entries_per_scope=cap)
    assert report.over_size == 3 * cap
    assert all(store.get(e.id) is not None for e in tenant_a)  # none of A's entries went
    kept_b = {e.id for e in tenant_b if store.get(e.id) is not None}
    assert kept_b == {e.id for e in sorted(tenant_b, key=lambda e: -e.cache_value)[:cap]}  # B's most valued
    assert store.stats() == {"entries": 3 + cap, "scopes": {"tenant-a": 3, "tenant-b": cap}}
    assert len(store.search("tenant-a", tenant_a[0].vector, limit=5, now=T0)) == 3


def test_evict_below_mean_with_grace(store, rng):
    old = T0 - 2 * HOUR
    spec = [(0.0, old), (0.0, old), (0.9, old), (0.8, old), (0.0, T0 - 60)]  # mean 0.34
    entries = [make("s", v, i, cache_value=val, created_at=c) for i, (v, (val, c)) in enumerate(zip(unit(rng, 5), spec))]
    store.add(entries)
    assert store.evict(now=T0, below_mean=False).total == 0
    report = store.evict(now=T0, below_mean=True, grace_s=HOUR)
    assert (report.expired, report.over_size, report.below_mean) == (0, 0, 2)
    assert {e.id for e in entries if store.get(e.id)} == {entries[2].id, entries[3].id, entries[4].id}
    # The young, valueless entry goes once it is past the grace period.
    assert store.evict(now=T0 + 2 * HOUR, below_mean=True, grace_s=HOUR).below_mean == 1
    assert store.get(entries[4].id) is None and len(store) == 2


def test_evict_below_mean_is_per_scope(store, rng):
    """One scope's high values never set another scope's bar (issue 13: a tenant that raised its own
    entries' values pushed every other tenant's entries below the global mean)."""
    old = T0 - 2 * HOUR
    rich = [make("rich", v, i, cache_value=0.9, created_at=old) for i, v in enumerate(unit(rng, 3))]
    poor = [make("poor", v, 10 + i, cache_value=val, created_at=old)
            for i, (v, val) in enumerate(zip(unit(rng, 3), (0.0, 0.0, 0.0)))]
    mixed = [make("mixed", v, 20 + i, cache_value=val, created_at=old)
             for i, (v, val) in enumerate(zip(unit(rng, 3), (0.6, 0.3, 0.0)))]  # mean 0.3
    store.add(rich + poor + mixed)
    report = store.evict(now=T0, below_mean=True, grace_s=HOUR)
    # Across all scopes the mean is 0.4: everything in "poor" and two of "mixed" would go. Per scope,
    # "rich" and "poor" are uniform (nothing below their own mean) and only mixed's 0.0 goes.
    assert report.below_mean == 1
    assert store.get(mixed[2].id) is None
    assert all(store.get(e.id) is not None for e in rich + poor + mixed[:2])
    assert store.stats()["scopes"] == {"rich": 3, "poor": 3, "mixed": 2}


def test_len(store, rng):
    assert len(store) == 0
    store.add([make("a", v, i) for i, v in enumerate(unit(rng, 5))])
    store.add([make("b", v, i) for i, v in enumerate(unit(rng, 2))])
    assert len(store) == 7


# ---------------------------------------------------------------------------------------- open_store

def test_open_store_picks_backend(tmp_path):
    from velo_proxy.settings import Settings

    s = open_store(Settings(data_dir=tmp_path), dim=DIM)
    try:
        assert isinstance(s, EmbeddedStore) and (tmp_path / "store" / "store.sqlite3").exists()
    finally:
        s.close()
    q = open_store(Settings(data_dir=tmp_path, qdrant_url=":memory:", qdrant_collection="c1"), dim=DIM)
    try:
        assert isinstance(q, QdrantStore) and q.collection == "c1" and q.dim == DIM
    finally:
        q.close()


# ---------------------------------------------------------------------------------------- embedded only

def test_embedded_persists_across_reopen(tmp_path, rng):
    path = tmp_path / "store"
    vecs = unit(rng, 50)
    entries = [make("a" if i % 2 else "b", v, i) for i, v in enumerate(vecs)]
    with EmbeddedStore(path, dim=DIM) as s:
        s.add(entries)
        s.record_use(entries[3].id, outcome=1.0)
        s.record_uses([(entries[6].id, 1.0), (entries[6].id, 0.0)])
        s.delete(entries[4].id)
        q = unit(rng)
        before = [(h.entry.id, h.similarity) for h in s.search("a", q, limit=5, now=T0)]
        stats = s.stats()
    with pytest.raises(RuntimeError):
        s.search("a", q, limit=5)
    with EmbeddedStore(path, dim=DIM) as s2:
        assert s2.stats() == stats and len(s2) == 49
        assert [(h.entry.id, h.similarity) for h in s2.search("a", q, limit=5, now=T0)] == before
        assert s2.get(entries[3].id).use_count == 1
        assert s2.get(entries[3].id).cache_value == pytest.approx(update_cache_value(0.0, 0, 1.0)[0])
        assert s2.get(entries[6].id).use_count == 2  # a batch of uses is durable too
        assert s2.get(entries[4].id) is None
        assert s2.get(entries[5].id).answer == entries[5].answer
    with pytest.raises(ValueError, match="dim"):
        EmbeddedStore(path, dim=128)


def test_embedded_refuses_vectors_of_another_embedder(tmp_path, rng, caplog):
    # MiniLM and multilingual-e5-small are both 384-d: the dimension alone cannot tell their vectors apart
    path = tmp_path / "store"
    with EmbeddedStore(path, dim=DIM, embedder_id="all-MiniLM-L6-v2") as s:
        s.add([make("a", unit(rng), 1)])
    with pytest.raises(ValueError, match="multilingual-e5-small"):
        EmbeddedStore(path, dim=DIM, embedder_id="multilingual-e5-small")
    with EmbeddedStore(path, dim=DIM, embedder_id="all-MiniLM-L6-v2") as s:
        assert len(s) == 1  # the refusal lost nothing
    legacy = tmp_path / "legacy"  # a store written before embedder ids were recorded
    with EmbeddedStore(legacy, dim=DIM) as s:
        s.add([make("a", unit(rng), 2)])
    with caplog.at_level("WARNING"), EmbeddedStore(legacy, dim=DIM, embedder_id="all-MiniLM-L6-v2") as s:
        assert len(s) == 1
    assert "records no embedder" in caplog.text
    with pytest.raises(ValueError, match="embedder"):
        EmbeddedStore(legacy, dim=DIM, embedder_id="multilingual-e5-small")


def test_qdrant_records_the_embedder_in_the_collection_and_every_point(rng):
    s = QdrantStore(":memory:", dim=DIM, collection="emb", embedder_id="all-MiniLM-L6-v2")
    e = make("a", unit(rng), 1)
    s.add([e])
    point = s._client.retrieve("emb", [s._client.scroll("emb", limit=1)[0][0].id], with_payload=True)[0]
    assert point.payload["embedder_id"] == "all-MiniLM-L6-v2"
    assert s._client.get_collection("emb").config.metadata == {"embedder_id": "all-MiniLM-L6-v2"}
    s.embedder_id = "multilingual-e5-small"  # what a proxy with another embedder finds on open
    with pytest.raises(ValueError, match="multilingual-e5-small"):
        s._ensure_collection()
    s.close()


def test_embedded_one_process_per_directory(tmp_path, rng):
    path = tmp_path / "store"
    s = EmbeddedStore(path, dim=DIM)
    with pytest.raises(RuntimeError, match="already open"):
        EmbeddedStore(path, dim=DIM)
    code = ("import sys; from velo_proxy.store.embedded import EmbeddedStore\n"
            "try:\n    EmbeddedStore(sys.argv[1], dim=384)\nexcept RuntimeError:\n    sys.exit(3)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    assert subprocess.run([sys.executable, "-c", code, str(path)], env=env).returncode == 3
    s.close()
    EmbeddedStore(path, dim=DIM).close()  # released on close


def test_embedded_rebuilds_missing_or_stale_snapshot_in_background(tmp_path, rng):
    import shutil

    path = tmp_path / "store"
    vecs, _ = topic_vectors(rng, 2800)
    entries = [make("s", v, i) for i, v in enumerate(vecs)]
    with EmbeddedStore(path, dim=DIM, ann_threshold=400) as s:
        s.add(entries[:1500])
        assert s.wait_for_indexes(60) and s._scopes["s"].ann is not None
    snapshots = list((path / "ann").glob("*.usearch"))
    assert len(snapshots) == 1
    old = tmp_path / "old.usearch"
    shutil.copy(snapshots[0], old)

    def check(s: EmbeddedStore, n: int) -> None:
        for i in (7, n - 1):  # searchable at once (exactly) while the index builds ...
            assert s.search("s", vecs[i], limit=1, now=T0)[0].entry.id == entries[i].id
        assert s.wait_for_indexes(60) and s._scopes["s"].ann is not None
        for i in (7, 1499, n - 1):  # ... and through the index afterwards
            assert [h.entry.id for h in s.search("s", vecs[i], limit=3, now=T0)] == \
                [entries[j].id for j in np.argsort(-(vecs[:n] @ vecs[i]))[:3]]

    # A stale snapshot (1300 entries behind) is patched in the background.
    with EmbeddedStore(path, dim=DIM, ann_threshold=400) as s:
        s.add(entries[1500:])
    shutil.copy(old, snapshots[0])
    with EmbeddedStore(path, dim=DIM, ann_threshold=400) as s:
        assert s._scopes["s"].building or s._scopes["s"].ann is not None
        check(s, 2800)
    # No snapshot at all (and an interrupted save lying around): rebuilt in the background.
    shutil.rmtree(path / "ann")
    (path / "ann").mkdir()
    (path / "ann" / "garbage.usearch.123.tmp").write_bytes(b"x")
    with EmbeddedStore(path, dim=DIM, ann_threshold=400) as s:
        assert not (path / "ann" / "garbage.usearch.123.tmp").exists()
        check(s, 2800)
    assert len(list((path / "ann").glob("*.usearch"))) == 1  # snapshotted for the next open


def topic_vectors(rng: np.random.Generator, n: int, topics: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Embedding-like data: entries cluster around topics (pure random 384-d vectors have no neighbours
    to speak of, the degenerate case for any graph index)."""
    centres = unit(rng, topics)
    x = 0.7 * centres[rng.integers(0, topics, n)] + 0.7 * unit(rng, n)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), centres


def recall_at_5(store: EmbeddedStore, scope: str, queries: np.ndarray, vecs: np.ndarray, ids: list[str],
                live: np.ndarray, now: float) -> float:
    found = 0
    for q in queries:
        sims = np.where(live, vecs @ q, -np.inf)
        truth = {ids[i] for i in np.argsort(-sims)[:5]}
        hits = store.search(scope, q, limit=5, now=now)
        assert all(live[ids.index(h.entry.id)] for h in hits)  # never a deleted or expired entry
        for h in hits:  # similarities are exact, not the quantised index's
            assert h.similarity == pytest.approx(float(vecs[ids.index(h.entry.id)] @ q), abs=1e-5)
        found += len(truth & {h.entry.id for h in hits})
    return found / (5 * len(queries))


def test_embedded_ann_recall_deletes_and_reopen(tmp_path, rng):
    n = 3000
    vecs, centres = topic_vectors(rng, n)
    expires = np.where(rng.random(n) < 0.1, T0 - 1, T0 + HOUR)  # 10 % expired, still in the index
    entries = [make("big", v, i, expires_at=float(expires[i])) for i, v in enumerate(vecs)]
    ids = [e.id for e in entries]
    path = tmp_path / "store"
    s = EmbeddedStore(path, dim=DIM, ann_threshold=500)
    for i in range(0, n, 250):
        s.add(entries[i:i + 250])
    s.add([make("small", v, i) for i, v in enumerate(unit(rng, 10))])
    assert s.wait_for_indexes(60)
    assert s._scopes["big"].ann is not None and s._scopes["small"].ann is None
    paraphrases = vecs[rng.integers(0, n, 60)] + 0.3 * unit(rng, 60)
    new_topic = 0.7 * centres[rng.integers(0, len(centres), 60)] + 0.7 * unit(rng, 60)
    queries = np.concatenate([paraphrases, new_topic])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    live = expires > T0
    assert recall_at_5(s, "big", queries, vecs, ids, live, T0) >= 0.95
    # Delete a third (including many of the true neighbours) and search again.
    gone = rng.choice(n, n // 3, replace=False)
    for i in gone:
        assert s.delete(ids[i])
    live[gone] = False
    assert len(s) == n - len(gone) + 10
    assert recall_at_5(s, "big", queries, vecs, ids, live, T0) >= 0.95
    s.close()
    assert (path / "ann").is_dir() and len(list((path / "ann").iterdir())) == 1  # the snapshot
    with EmbeddedStore(path, dim=DIM, ann_threshold=500) as s2:
        assert s2._scopes["big"].ann is not None
        assert recall_at_5(s2, "big", queries, vecs, ids, live, T0) >= 0.95
        # Evicting the expired and then most of the rest drops the scope back to exact search.
        assert s2.evict(now=T0).expired == int(np.count_nonzero(expires[~np.isin(np.arange(n), gone)] <= T0))
        s2.evict(now=T0, max_entries_per_scope=200)
        assert s2._scopes["big"].ann is None
        live_ids = {e.id for e in entries if s2.get(e.id) is not None}
        assert len(live_ids) <= 200
        q = queries[0]
        hits = s2.search("big", q, limit=5, now=T0)
        mask = np.array([i in live_ids for i in ids])
        expected = [ids[i] for i in np.argsort(-np.where(mask, vecs @ q, -np.inf))[:5]]
        assert [h.entry.id for h in hits] == expected


def test_embedded_concurrent_add_and_search(tmp_path, rng):
    s = EmbeddedStore(tmp_path / "store", dim=DIM, ann_threshold=300)
    vecs = unit(rng, 1200)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(k * 400, (k + 1) * 400, 20):
                s.add([make("s", vecs[j], j) for j in range(i, i + 20)])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def reader() -> None:
        try:
            for j in range(300):
                for h in s.search("s", vecs[j], limit=5, now=T0):
                    assert h.entry.scope == "s"
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert s.wait_for_indexes(60)
    assert len(s) == 1200 and s._scopes["s"].ann is not None
    for j in (0, 599, 1199):
        hit = s.search("s", vecs[j], limit=1, now=T0)[0]
        assert hit.entry.question == f"question {j}" and hit.similarity == pytest.approx(1.0, abs=1e-5)
    s.close()


def test_embedded_survives_kill_9_mid_write(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from store_crash_writer import vector_for

    path = tmp_path / "store"
    writer = Path(__file__).with_name("store_crash_writer.py")
    reported = 0
    for round_ in range(2):  # the second round starts from the crashed store
        proc = subprocess.Popen([sys.executable, str(writer), str(path), str(DIM), "300", f"run{round_}"],
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.time() + 40
            target = reported + 1200
            while time.time() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                reported = int(line.split()[1])
                if reported >= target:
                    break
            time.sleep(0.005 * (round_ + 1))  # land inside a later add
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == -signal.SIGKILL
        assert reported >= target, "writer was too slow"
        # Lines printed after the last one we read are committed too; drain them.
        for line in proc.stdout.read().splitlines(keepends=True):
            if line.endswith("\n"):  # the writer writes whole lines; this only guards the count
                reported = int(line.split()[1])

        with sqlite3.connect(path / "store.sqlite3") as db:
            sql_count = db.execute("SELECT count(*) FROM entries").fetchone()[0]
        s = EmbeddedStore(path, dim=DIM, ann_threshold=300)
        try:
            assert len(s) == sql_count
            assert reported <= len(s) <= reported + 8  # everything acknowledged is there, at most one batch more
            assert sum(s.stats()["scopes"].values()) == len(s)
            batches: dict[tuple[str, int], list[int]] = {}
            ann_misses = 0
            for scope, count in s.stats()["scopes"].items():
                assert s._scopes[scope].n == count
            for entry_id in list(s._by_id):
                e = s.get(entry_id)
                assert e.question == f"q-{entry_id}"
                assert e.answer["message"]["content"] == "x" * 900 + entry_id
                assert e.scope == f"scope-{int(entry_id[:2], 16) % 3}"
                assert abs(float(np.linalg.norm(e.vector)) - 1.0) < 1e-5
                np.testing.assert_array_equal(e.vector, vector_for(entry_id, DIM))
                batches.setdefault((e.answer["run"], e.answer["batch"]), []).append(e.answer["batch_size"])
                # The arrays and the vector behind each row agree: an exact scan finds the entry itself...
                sc = s._scopes[e.scope]
                rows, sims = s._search_exact(sc, e.vector, 1, time.time())
                assert sc.ids[int(rows[0])] == entry_id and float(sims[0]) == pytest.approx(1.0, abs=1e-5)
                # ...and so does the (approximate) HNSW index nearly always. Random 384-d vectors are the
                # hardest case for HNSW: about 1 self-query in 7,000 misses, so a miss is not a lost entry.
                hit = s.search(e.scope, e.vector, limit=1)[0]
                ann_misses += hit.entry.id != entry_id
            assert ann_misses <= max(2, len(s) // 200), ann_misses
            # Every add landed whole or not at all.
            for key, sizes in batches.items():
                assert len(sizes) == sizes[0], (key, sizes)
            assert any(s._scopes[sc].ann is not None for sc in s._scopes)  # the ANN path was exercised
        finally:
            s.close()
