"""Cache-store benchmark: search latency, add throughput, open/rebuild time and RSS.

    python benchmarks/store.py                      # embedded + Qdrant(:memory:), 10k and 100k entries
    python benchmarks/store.py --sizes 10000 --backends embedded --json out.json

For each back-end, size and layout (all entries in one scope, or spread over 1000 scopes):
* bulk add throughput (batches of 1000) while filling the store, then single-entry adds (what the proxy
  does after a B/C answer) at the filled size;
* single-thread search latency p50/p99 of ``search(scope, q, limit=5)``; queries are a mix of
  paraphrases of stored entries and new questions on a stored topic;
* for the embedded store with one big scope: recall@5 of the HNSW path against exact numpy search;
* for the embedded store at the largest size: open time (from the ANN snapshot, and without it: then the
  HNSW index is rebuilt in the background while searches run exactly) and the RSS of a fresh process
  after opening (measured in a child process).

Vectors are embedding-like (clustered around topics; pure random 384-d vectors are the degenerate case
for a graph index), payloads realistic (~1 KB answer). Qdrant's local mode is slow (it scans in Python):
its runs are capped by ``--qdrant-budget-s`` per phase and report how far they got.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from velo_proxy.store.base import CacheEntry  # noqa: E402

DIM = 384
TOPICS = 1000


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def topic_data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    centres = unit(rng, TOPICS)
    x = 0.7 * centres[rng.integers(0, TOPICS, n)] + 0.7 * unit(rng, n)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), centres


def queries_for(rng: np.random.Generator, vecs: np.ndarray, centres: np.ndarray, n: int) -> np.ndarray:
    half = n // 2
    para = vecs[rng.integers(0, len(vecs), half)] + 0.3 * unit(rng, half)
    new = 0.7 * centres[rng.integers(0, len(centres), n - half)] + 0.7 * unit(rng, n - half)
    q = np.concatenate([para, new])
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


ANSWER_TEXT = ("The cache keeps answers close to the users who ask for them. " * 17)[:1000]


def entry(scope: str, v: np.ndarray, i: int, now: float) -> CacheEntry:
    return CacheEntry(scope=scope, vector=v, question=f"How do I configure option number {i} of the proxy for my team?",
                      answer={"message": {"role": "assistant", "content": ANSWER_TEXT},
                              "finish_reason": "stop",
                              "usage": {"prompt_tokens": 21, "completion_tokens": 230, "total_tokens": 251}},
                      model="qwen-14b", expires_at=now + 7 * 86400, created_at=now)


def rss_mb(field: str = "VmRSS") -> float:
    """Current (VmRSS) or peak (VmHWM) resident set of this process, MB. (Not ru_maxrss: Linux keeps
    that across exec, so a child would report its parent's peak.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pct(lat: list[float]) -> dict[str, float]:
    a = np.asarray(lat) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3),
            "n": len(lat)}


def open_store(backend: str, path: Path):
    if backend == "embedded":
        from velo_proxy.store.embedded import EmbeddedStore

        return EmbeddedStore(path, dim=DIM)
    from velo_proxy.store.qdrant import QdrantStore

    return QdrantStore(":memory:", dim=DIM)


def run_case(backend: str, size: int, layout: str, args: argparse.Namespace, workdir: Path) -> dict:
    rng = np.random.default_rng(size + (1 if layout == "scopes" else 0))
    budget = args.qdrant_budget_s if backend == "qdrant" else float("inf")
    vecs, centres = topic_data(rng, size)
    n_scopes = 1 if layout == "one" else args.scopes
    scope_of = rng.integers(0, n_scopes, size)
    now = time.time()
    path = workdir / f"{backend}-{size}-{layout}"
    store = open_store(backend, path)
    result: dict = {"backend": backend, "size": size, "layout": layout, "scopes": n_scopes}

    # --- bulk fill
    t0 = time.perf_counter()
    added = 0
    for i in range(0, size, 1000):
        store.add([entry(f"s{scope_of[j]}", vecs[j], j, now) for j in range(i, min(size, i + 1000))])
        added = min(size, i + 1000)
        if time.perf_counter() - t0 > budget:
            break
    fill_s = time.perf_counter() - t0
    result["filled"] = added
    result["bulk_add_per_s"] = round(added / fill_s, 1)
    vecs, scope_of = vecs[:added], scope_of[:added]

    # --- search latency
    queries = queries_for(rng, vecs, centres, args.queries)
    # For the many-scope layout a query goes to the scope of the entry it paraphrases (or a random one).
    q_scopes = [f"s{scope_of[rng.integers(0, added)]}" for _ in range(len(queries))]
    for q, sc in zip(queries[:20], q_scopes):  # warm-up
        store.search(sc, q, limit=5)
    lat = []
    t_start = time.perf_counter()
    for q, sc in zip(queries, q_scopes):
        t = time.perf_counter()
        store.search(sc, q, limit=5)
        lat.append(time.perf_counter() - t)
        if time.perf_counter() - t_start > budget:
            break
    result["search"] = pct(lat)

    # --- recall of the ANN path (embedded, one big scope)
    if backend == "embedded" and layout == "one" and added > store.ann_threshold:
        found = 0
        k = 0
        for q in queries[:200]:
            truth = set(np.argsort(-(vecs @ q))[:5].tolist())
            hits = store.search("s0", q, limit=5)
            got = {int(h.entry.question.split("number ")[1].split()[0]) for h in hits}
            found += len(truth & got)
            k += 5
        result["recall_at_5"] = round(found / k, 4)

    # --- single adds at the filled size (the proxy's pattern: one entry after a B/C answer)
    extra = unit(rng, args.single_adds)
    lat = []
    t_start = time.perf_counter()
    for i, v in enumerate(extra):
        e = entry(f"s{rng.integers(0, n_scopes)}", v, added + i, now)
        t = time.perf_counter()
        store.add([e])
        lat.append(time.perf_counter() - t)
        if time.perf_counter() - t_start > budget:
            break
    result["single_add"] = pct(lat)
    result["single_add_per_s"] = round(len(lat) / sum(lat), 1)
    store.close()
    if backend == "embedded":
        result["disk_mb"] = round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1)
    return result


def open_child(path: str) -> None:
    """Child process: open the embedded store, search, wait for any index build, report times and RSS."""
    from velo_proxy.store.embedded import EmbeddedStore

    base = rss_mb()
    t0 = time.perf_counter()
    s = EmbeddedStore(Path(path), dim=DIM)
    open_s = time.perf_counter() - t0
    rng = np.random.default_rng(7)
    scope = max(s.stats()["scopes"].items(), key=lambda kv: kv[1])[0]

    def lat(n: int) -> dict:
        out = []
        for q in unit(rng, n):
            t = time.perf_counter()
            s.search(scope, q, limit=5)
            out.append(time.perf_counter() - t)
        return pct(out)

    building = any(t.is_alive() for t in s._builders)
    during = lat(100) if building else None
    s.wait_for_indexes()
    ready_s = time.perf_counter() - t0
    out = {"open_s": round(open_s, 2), "index_ready_s": round(ready_s, 2),
           "phases": {k: round(v, 2) for k, v in s.open_stats.items()},
           "entries": len(s), "rss_mb": round(rss_mb(), 1), "rss_before_open_mb": round(base, 1),
           "peak_rss_mb": round(rss_mb("VmHWM"), 1),
           "search_while_index_builds": during, "search_after_open": lat(300)}
    s.close()
    print(json.dumps(out))


def measure_open(path: Path, *, rebuild: bool) -> dict:
    if rebuild:
        shutil.rmtree(path / "ann", ignore_errors=True)
    out = subprocess.run([sys.executable, __file__, "--open-child", str(path)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--backends", default="embedded,qdrant")
    ap.add_argument("--layouts", default="one,scopes")
    ap.add_argument("--scopes", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--single-adds", type=int, default=300)
    ap.add_argument("--qdrant-budget-s", type=float, default=90.0, help="cap of each Qdrant phase")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--open-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.open_child:
        open_child(args.open_child)
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="velo-store-bench-"))
    results = []
    sizes = [int(s) for s in args.sizes.split(",")]
    for backend in args.backends.split(","):
        for size in sizes:
            for layout in args.layouts.split(","):
                r = run_case(backend, size, layout, args, workdir)
                print(json.dumps(r), flush=True)
                results.append(r)
                if backend == "embedded" and size == max(sizes) and layout == "one":
                    path = workdir / f"{backend}-{size}-{layout}"
                    o = {"case": "embedded open", "size": size, "from_snapshot": measure_open(path, rebuild=False),
                         "full_rebuild": measure_open(path, rebuild=True)}
                    print(json.dumps(o), flush=True)
                    results.append(o)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
