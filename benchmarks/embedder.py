"""Embedder benchmark: single-query latency and batch throughput of the ONNX embedder.

    python benchmarks/embedder.py [--model-dir DIR] [--threads 1 2] [--queries 200] [--batch 32]

For each onnxruntime thread count it prints:
- single-query latency p50/p99 over ``--queries`` real questions (QQP, one at a time, blocking call);
- the same through the async micro-batcher (``await embed([q])``, one caller; the proxy's path);
- batch throughput in sentences/s at ``--batch`` (one blocking call per batch, unsorted), and
  ``embed_sync`` over the same 640 questions (length-sorted batches, the offline jobs' path);
- async throughput with ``--clients`` concurrent callers, each sending single queries
  (micro-batching at work), with the callers' p50/p99.

Questions come from ``pairs/qqp-dev.jsonl`` of the datasets directory (``VELO_DATASETS_DIR``, default
``../shared/data``) when present (else synthetic ones).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from velo_proxy.embedder import OnnxEmbedder  # noqa: E402
from velo_proxy.settings import Settings  # noqa: E402

def _qqp() -> Path | None:
    from policy.data import DatasetsMissing, data_dir

    try:
        return data_dir() / "pairs" / "qqp-dev.jsonl"
    except DatasetsMissing:
        return None


def load_questions(n: int) -> list[str]:
    out: list[str] = []
    QQP = _qqp()
    if QQP is not None and QQP.is_file():
        with open(QQP, encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                out.extend(q for q in (row.get("q1"), row.get("q2")) if q)
                if len(out) >= n:
                    break
    i = 0
    while len(out) < n:
        out.append(f"What is the best way to learn topic number {i} quickly and well?")
        i += 1
    return out[:n]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def bench_single(emb: OnnxEmbedder, queries: list[str]) -> tuple[float, float]:
    for q in queries[:20]:
        emb.embed_sync([q])
    times = []
    for q in queries:
        t0 = time.perf_counter()
        emb.embed_sync([q])
        times.append(time.perf_counter() - t0)
    return pct(times, 50), pct(times, 99)


async def bench_async_single(emb: OnnxEmbedder, queries: list[str]) -> tuple[float, float]:
    await emb.start()
    try:
        for q in queries[:20]:
            await emb.embed([q])
        times = []
        for q in queries:
            t0 = time.perf_counter()
            await emb.embed([q])
            times.append(time.perf_counter() - t0)
    finally:
        await emb.aclose()
    return pct(times, 50), pct(times, 99)


def bench_batch(emb: OnnxEmbedder, texts: list[str], batch: int, rounds: int) -> float:
    batches = [texts[i : i + batch] for i in range(0, len(texts) - batch + 1, batch)]
    emb._infer(batches[0])
    n = 0
    t0 = time.perf_counter()
    for _ in range(rounds):
        for b in batches:
            emb._infer(b)
            n += len(b)
    return n / (time.perf_counter() - t0)


async def bench_concurrent(emb: OnnxEmbedder, texts: list[str], clients: int) -> tuple[float, float, float, float]:
    await emb.start()
    times: list[float] = []
    per_client = max(1, len(texts) // clients)

    async def client(k: int) -> None:
        for q in texts[k * per_client : (k + 1) * per_client]:
            t0 = time.perf_counter()
            await emb.embed([q])
            times.append(time.perf_counter() - t0)

    try:
        await asyncio.gather(*(client(k) for k in range(min(clients, 8))))  # warm-up
        times.clear()
        batches0 = emb.batches_run
        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        elapsed = time.perf_counter() - t0
        batches = emb.batches_run - batches0
    finally:
        await emb.aclose()
    return len(times) / elapsed, pct(times, 50), pct(times, 99), len(times) / max(batches, 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=Settings().embedder_dir)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="passes over the batch set")
    ap.add_argument("--clients", type=int, default=32, help="concurrent callers in the async test")
    args = ap.parse_args(argv)

    queries = load_questions(max(args.queries, 640))
    single_set = queries[: args.queries]
    tok_lens = None
    print(f"model {args.model_dir}  cpus {os.cpu_count()}  questions {'QQP dev' if QQP.is_file() else 'synthetic'}")
    for threads in args.threads:
        emb = OnnxEmbedder(args.model_dir, threads=threads, max_batch=args.batch, batch_wait_ms=1.0)
        if tok_lens is None:
            tok_lens = [int(emb.tokenize([q])[1].sum()) for q in single_set]
            print(f"query length: median {statistics.median(tok_lens):.0f} tokens, max {max(tok_lens)}")
        p50, p99 = bench_single(emb, single_set)
        a50, a99 = asyncio.run(bench_async_single(emb, single_set))
        tput = bench_batch(emb, queries[:640], args.batch, args.rounds)
        t0 = time.perf_counter()
        emb.embed_sync(queries[:640], batch_size=args.batch)
        sorted_tput = 640 / (time.perf_counter() - t0)
        c_tput, c50, c99, per_batch = asyncio.run(bench_concurrent(emb, queries[:640], args.clients))
        print(
            f"threads={threads}: single query p50 {p50:.2f} ms  p99 {p99:.2f} ms | "
            f"async single p50 {a50:.2f} ms  p99 {a99:.2f} ms | "
            f"batch {args.batch}: {tput:.0f} sentences/s ({sorted_tput:.0f} length-sorted, embed_sync) | "
            f"{args.clients} concurrent callers: {c_tput:.0f} sentences/s, p50 {c50:.1f} ms  p99 {c99:.1f} ms, "
            f"{per_batch:.1f} texts/batch",
            flush=True,
        )


if __name__ == "__main__":
    main()
