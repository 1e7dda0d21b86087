"""Speed benchmark: what does the proxy add to latency, and how much can it serve?

    python benchmarks/latency.py                 # full run, rewrites the speed section of docs/benchmarks.md
    python benchmarks/latency.py --tiny --no-doc --json /tmp/l.json   # smoke size

Everything runs for real on 127.0.0.1: the fake upstream (``velo_proxy.devtools.fake_upstream``,
``--upstream-latency-ms`` 500 by default) and ``python -m velo_proxy serve`` as subprocesses, load from
``wrk`` (``benchmarks/rotate.lua``, one wrk thread, closed loop, bounded request counts) at concurrency
1, 8 and 32, and a small asyncio client for the streamed time-to-first-byte.

Per configuration (embedded store with 10k and 100k entries; Qdrant ``:memory:`` at the size it can
hold, filled through the proxy: it cannot be prefilled from outside the process):

* **semantic hit**: QQP paraphrases whose cached original is in the store (cosine 0.955-0.995, so the
  static 0.95 policy serves them); every request carries a distinct ``seed`` so the exact tier never
  answers and the full path runs (embed, search, policy, serve);
* **exact hit**: the same bodies repeated verbatim (primed once), answered by the exact tier;
* **miss**: questions nobody asked before (QQP, cosine < 0.85 to every cached question), forwarded to
  the upstream and cached; overhead = proxy miss latency - upstream latency at the same concurrency;
* **streamed hit TTFB**: ``stream=true`` semantic hits, time to the first SSE data chunk;
* **peak memory**: VmHWM of the proxy process (``/proc/<pid>/status``) after all of it.

The store is prefilled before the proxy starts (``EmbeddedStore`` on the proxy's data dir): real MiniLM
embeddings for the questions the hits should find, random unit vectors for the filler, all in the scope
the proxy computes for these requests (tenant ``default``, model ``bench-model``, no context).

Side by side in the same run: the upstream called directly (the floor), and GPTCache's server
(``gptcache_server``'s FastAPI app, ``POST /get``: lookup only, our embedder plugged in, sqlite + faiss,
the same 10k entries). GPTCache's ``/v1/chat/completions`` proxy path needs ``openai<1.0`` (it calls
``openai.ChatCompletion``), which cannot be installed next to the proxy's dependencies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import CACHE_DIR, DOCS, IMG, REPO, md_table, pct  # noqa: E402

MODEL = "bench-model"
PROFILE_RATE = 200  # py-spy samples per second and thread
REQUEST_CAP = 50_000  # per wrk run, a safety bound; runs are bounded by their duration (wrk -d)
DIM = 384
LUA = Path(__file__).resolve().parent / "rotate.lua"
ANSWER_PAD = (" The answer explains the background, gives the main facts and a short example, and ends with"
              " a one-line summary so that the cached payload has a realistic size.") * 4


# ----- processes ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def status(self) -> dict[str, int]:
        out = {}
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(("VmHWM", "VmRSS")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) // 1024  # MB
        except OSError:
            pass
        return out

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


def wait_http(url: str, timeout_s: float, proc: Proc | None = None) -> None:
    import httpx

    deadline = time.time() + timeout_s
    last = ""
    while time.time() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}); log {proc.log}:\n"
                               + proc.log.read_text()[-3000:])
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except Exception as exc:  # noqa: BLE001
            last = repr(exc)
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready in {timeout_s} s: {last}")


def start_upstream(latency_ms: float, workdir: Path, port: int | None = None) -> Proc:
    port = port or free_port()
    log = workdir / f"upstream-{port}.log"
    popen = subprocess.Popen([sys.executable, "-m", "velo_proxy.devtools.fake_upstream", "--port", str(port),
                              "--latency-ms", str(latency_ms)], cwd=REPO, stdout=open(log, "w"),
                             stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    p = Proc("fake upstream", popen, port, log)
    wait_http(p.url + "/v1/models", 60, p)
    return p


def loosest_calibrated_delta() -> float:
    """The loosest false-hit bound the exported verifier's calibration holds: the bound at which the verified
    policy serves the most, so that its semantic-hit path (embed, search, verify, serve) can be timed."""
    from velo_proxy.settings import Settings
    from velo_proxy.verifier import PairVerifier

    settings = Settings()
    embedder_id = json.loads((settings.embedder_dir / "velo_embedder.json").read_text())["id"]
    # the calibration block the proxy will use: the one for the embedder it serves with
    thresholds = PairVerifier(settings.verifier_dir, embedder_id=embedder_id).calibration.get("thresholds", {})
    return max((float(d) for d in thresholds), default=0.02)


def start_proxy(upstream: Proc, data_dir: Path, workdir: Path, *, policy: str, qdrant: bool,
                max_false_hit_rate: float | None = None) -> Proc:
    port = free_port()
    log = workdir / f"proxy-{port}.log"
    # Shadow checks off: they re-ask the upstream for 5 % of hits in the background and evict entries whose
    # answers disagree, and the fake upstream never agrees with the synthetic cached answers.
    env = {**os.environ, "PYTHONPATH": str(REPO), "VELO_UPSTREAM_BASE_URL": upstream.url + "/v1",
           "VELO_SHADOW_RATE": "0",
           "VELO_DATA_DIR": str(data_dir), "VELO_PORT": str(port), "VELO_HOST": "127.0.0.1",
           "VELO_POLICY": policy, "VELO_LOG_LEVEL": "warning", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    if max_false_hit_rate is not None:
        env["VELO_MAX_FALSE_HIT_RATE"] = str(max_false_hit_rate)
    if qdrant:
        env["VELO_QDRANT_URL"] = ":memory:"
    else:
        env.pop("VELO_QDRANT_URL", None)
    popen = subprocess.Popen([sys.executable, "-m", "velo_proxy", "serve"], cwd=REPO, stdout=open(log, "w"),
                             stderr=subprocess.STDOUT, env=env)
    p = Proc("proxy", popen, port, log)
    wait_http(p.url + "/readyz", 600, p)
    return p


# ----- request sets ---------------------------------------------------------------------------------------


@dataclass
class Sets:
    origins: list[str]  # cached questions (real embeddings)
    origin_emb: np.ndarray
    paraphrases: list[str]  # semantic-hit bodies, aligned with origins
    para_sim: np.ndarray
    misses: list[str]  # never-seen questions


def build_sets(n_hits: int, n_misses: int, seed: int = 0) -> Sets:
    """From the same 20k-pair QQP sample as the quality benchmark (so the embeddings are cached)."""
    data = common.require_data()
    rows = [json.loads(line) for line in open(data / "pairs" / "qqp-dev.jsonl", encoding="utf-8")]
    rows = random.Random(seed).sample(rows, min(20000, len(rows)))
    emb = common.EmbeddingCache(common.load_embedder())
    dups = [(r["q1"].strip(), r["q2"].strip()) for r in rows if int(r["duplicate"]) == 1
            and r["q1"].strip() and r["q2"].strip() and r["q1"].strip() != r["q2"].strip()]
    dups = dups[: max(4 * n_hits, 400)]
    e1 = emb.get([a for a, _ in dups], progress="latency origins")
    e2 = emb.get([b for _, b in dups], progress="latency paraphrases")
    sims = np.einsum("ij,ij->i", e1, e2)
    seen: set[str] = set()
    pick = []
    for i in np.argsort(-sims):
        a, b = dups[i]
        if 0.955 <= sims[i] <= 0.995 and a not in seen and b not in seen:
            seen.update((a, b))
            pick.append(int(i))
        if len(pick) >= n_hits:
            break
    pick.sort()
    origins = [dups[i][0] for i in pick]
    origin_emb = e1[pick]
    pool = []
    for r in rows:
        if int(r["duplicate"]) == 0:
            for t in (r["q1"].strip(), r["q2"].strip()):
                if t and t not in seen:
                    seen.add(t)
                    pool.append(t)
        if len(pool) >= 3 * n_misses:
            break
    pe = emb.get(pool, progress="latency misses")
    far = (pe @ origin_emb.T).max(axis=1) < 0.85 if len(origin_emb) else np.ones(len(pool), bool)
    misses = [t for t, ok in zip(pool, far) if ok][:n_misses]
    return Sets(origins, origin_emb, [dups[i][1] for i in pick], sims[pick], misses)


def scope_for_requests() -> str:
    from velo_proxy.protocol import ChatCompletionRequest
    from velo_proxy.scope import cache_key

    payload = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 0}
    chat = ChatCompletionRequest.model_validate(payload)
    key = cache_key(chat, payload, tenant="default")
    assert key is not None
    return key.scope


def answer_for(question: str) -> dict[str, Any]:
    text = f"Cached answer to: {question}.{ANSWER_PAD}"
    return {"message": {"role": "assistant", "content": text}, "finish_reason": "stop",
            "usage": {"prompt_tokens": 12, "completion_tokens": len(text.split()), "total_tokens": 12 + len(text.split())}}


def prefill_embedded(data_dir: Path, sets: Sets, total: int, seed: int = 1) -> dict[str, float]:
    from velo_proxy.store.base import CacheEntry
    from velo_proxy.store.embedded import EmbeddedStore

    scope = scope_for_requests()
    t0 = time.time()
    store = EmbeddedStore(data_dir / "store", dim=DIM)
    now = time.time()
    rng = np.random.default_rng(seed)
    try:
        entries = [CacheEntry(scope=scope, vector=v, question=q, answer=answer_for(q), model=MODEL,
                              expires_at=now + 7 * 86400, created_at=now) for q, v in zip(sets.origins, sets.origin_emb)]
        store.add(entries)
        n_fill = max(0, total - len(entries))
        batch = 2000
        for start in range(0, n_fill, batch):
            k = min(batch, n_fill - start)
            v = rng.standard_normal((k, DIM)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            store.add([CacheEntry(scope=scope, vector=v[j], question=f"filler question {start + j}",
                                  answer=answer_for(f"filler question {start + j}"), model=MODEL,
                                  expires_at=now + 7 * 86400, created_at=now) for j in range(k)])
        t_add = time.time() - t0
        store.wait_for_indexes()
        n = len(store)
    finally:
        store.close()  # snapshots the HNSW index so the proxy opens it instead of rebuilding
    return {"entries": n, "add_s": round(t_add, 1), "total_s": round(time.time() - t0, 1)}


# ----- load ----------------------------------------------------------------------------------------------------


def chat_template(stream: bool = False, seeded: bool = True) -> str:
    body = '{"model": "%s", "messages": [{"role": "user", "content": @Q@}], "temperature": 0' % MODEL
    if seeded:
        body += ', "seed": @N@'
    if stream:
        body += ', "stream": true'
    return body + "}"


def write_spec(path: Path, url_path: str, template: str, texts: Sequence[str]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(url_path + "\n" + template + "\n")
        for t in texts:
            fh.write(json.dumps(t, ensure_ascii=False) + "\n")
    return path


def run_wrk(base_url: str, spec: Path, *, connections: int, max_requests: int, duration_s: float,
            offset: int = 0, timeout_s: float = 10.0) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{int(duration_s)}s", f"--timeout={int(timeout_s)}s", "-s", str(LUA),
           base_url, "--", str(spec), str(max_requests), str(offset)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
    m = re.search(r"^WRKJSON (.*)$", out.stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")
    r = json.loads(m.group(1))
    secs = r["duration_us"] / 1e6
    lat = r["latency_us"]
    return {"c": connections, "requests": r["requests"], "seconds": round(secs, 2),
            "rps": r["requests"] / secs if secs else float("nan"),
            "p50_ms": lat["p50"] / 1000, "p95_ms": lat["p95"] / 1000, "p99_ms": lat["p99"] / 1000,
            "mean_ms": lat["mean"] / 1000, "max_ms": lat["max"] / 1000,
            "errors": sum(r["errors"].values()), "actions": r["actions"]}


async def _ttfb_client(url: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    import httpx

    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    headers_ms: list[float] = []
    first_ms: list[float] = []
    total_ms: list[float] = []
    actions: dict[str, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                t0 = time.perf_counter()
                async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
                    t_h = time.perf_counter()
                    a = resp.headers.get("x-velo-action", "none")
                    actions[a] = actions.get(a, 0) + 1
                    t_first = None
                    async for chunk in resp.aiter_raw():
                        if t_first is None and chunk:
                            t_first = time.perf_counter()
                    t_end = time.perf_counter()
                headers_ms.append(1000 * (t_h - t0))
                first_ms.append(1000 * ((t_first or t_end) - t0))
                total_ms.append(1000 * (t_end - t0))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"c": concurrency, "requests": len(first_ms), "ttfb_p50_ms": pct(first_ms, 50),
            "ttfb_p95_ms": pct(first_ms, 95), "ttfb_p99_ms": pct(first_ms, 99),
            "headers_p50_ms": pct(headers_ms, 50), "total_p50_ms": pct(total_ms, 50), "actions": actions}


def ttfb(url: str, texts: Sequence[str], *, concurrency: int, n: int, seed0: int) -> dict[str, Any]:
    bodies = [{"model": MODEL, "messages": [{"role": "user", "content": texts[i % len(texts)]}], "temperature": 0,
               "seed": seed0 + i, "stream": True} for i in range(n)]
    return asyncio.run(_ttfb_client(url, bodies, concurrency))


def probe_served(url: str, texts: Sequence[str], concurrency: int = 32) -> tuple[list[str], dict[str, int]]:
    """Ask every candidate paraphrase once (``Cache-Control: no-store``, so nothing new is cached) and keep
    those the running policy serves from the cache (A): the semantic-hit bodies of this proxy."""
    import httpx

    async def go() -> tuple[list[str], dict[str, int]]:
        served: list[str] = []
        actions: dict[str, int] = {}
        q: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
        for i, t in enumerate(texts):
            q.put_nowait((i, t))
        async with httpx.AsyncClient(timeout=60.0) as client:
            async def worker() -> None:
                while not q.empty():
                    i, t = q.get_nowait()
                    r = await client.post(url + "/v1/chat/completions", headers={"Cache-Control": "no-store"}, json={
                        "model": MODEL, "messages": [{"role": "user", "content": t}], "temperature": 0,
                        "seed": 7 * 10**8 + i})
                    a = r.headers.get("x-velo-action", "none")
                    actions[a] = actions.get(a, 0) + 1
                    if a == "A":
                        served.append(t)
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        order = {t: i for i, t in enumerate(texts)}
        return sorted(served, key=order.__getitem__), actions

    return asyncio.run(go())


def prime_exact(url: str, texts: Sequence[str]) -> dict[str, int]:
    import httpx

    actions: dict[str, int] = {}
    with httpx.Client(timeout=30.0) as client:
        for t in texts:
            r = client.post(url + "/v1/chat/completions",
                            json={"model": MODEL, "messages": [{"role": "user", "content": t}], "temperature": 0})
            a = r.headers.get("x-velo-action", "none")
            actions[a] = actions.get(a, 0) + 1
    return actions


def policy_header(url: str, text: str) -> str:
    import httpx

    r = httpx.post(url + "/v1/chat/completions", timeout=30.0,
                   json={"model": MODEL, "messages": [{"role": "user", "content": text}], "temperature": 0, "seed": -1})
    return r.headers.get("x-velo-policy", "?")


# ----- profiling -------------------------------------------------------------------------------------------------


def profile_proxy(proxy: Proc, base_url: str, spec: Path, *, connections: int, seconds: int, out: Path,
                  offset: int) -> dict[str, Any]:
    """py-spy on the proxy process during a wrk run; returns the top functions by inclusive share."""
    if shutil.which("py-spy") is None:
        return {"error": "py-spy not installed"}
    raw = out.with_suffix(".txt")
    spy = subprocess.Popen(["py-spy", "record", "-p", str(proxy.pid), "-d", str(seconds), "-r", str(PROFILE_RATE), "--nonblocking",
                            "-f", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    load = run_wrk(base_url, spec, connections=connections, max_requests=10**6, duration_s=seconds - 2, offset=offset)
    _, err = spy.communicate(timeout=seconds + 60)
    if not raw.exists():
        return {"error": f"py-spy failed: {err[-500:]}"}
    summary = summarize_raw_profile(raw)
    # samples are taken per thread at RATE Hz: count / RATE = seconds of that thread's time in the function
    n = max(1, load["requests"])
    for key in ("top_inclusive", "top_self"):
        summary[key] = [(k, share, round(1000.0 * count / PROFILE_RATE / n, 2)) for k, share, count in summary[key]]
    return {"load": load, "rate_hz": PROFILE_RATE, **summary}


def summarize_raw_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    """Inclusive and self sample shares per function from py-spy's collapsed-stack output."""
    incl: dict[str, int] = {}
    selfc: dict[str, int] = {}
    total = 0
    idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = stack.split(";")
        total += n
        leaf = frames[-1] if frames else ""
        if any(k in leaf for k in ("select (selectors.py", "_worker (concurrent/futures/thread.py", "wait (threading.py",
                                   "_bootstrap (threading.py")) or "(selectors.py" in leaf:
            idle += n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
        selfc[leaf] = selfc.get(leaf, 0) + n

    generic = ("threading.py", "<frozen runpy>", "asyncio/runners.py", "asyncio/base_events.py", "uvicorn/main.py",
               "uvicorn/server.py", "uvicorn/_compat.py", "velo_proxy/cli.py", "velo_proxy/__main__.py",
               "concurrent/futures/thread.py", "asyncio/events.py")
    incl = {k: v for k, v in incl.items() if not any(g in k for g in generic)}

    def rows(d: dict[str, int]) -> list[tuple[str, float, int]]:
        return [(k, round(100.0 * v / total, 1), v) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]] if total else []

    return {"samples": total, "idle_share": round(100.0 * idle / total, 1) if total else 0.0,
            "top_inclusive": rows(incl), "top_self": rows(selfc)}


# ----- GPTCache's server ---------------------------------------------------------------------------------------


GPTCACHE_LAUNCHER = r'''
import sys, json, numpy as np
sys.path.insert(0, {repo!r})
import types
import faiss
faiss.omp_set_num_threads(1)
# gptcache_server imports gptcache.adapter.openai, which subclasses openai.ChatCompletion (removed in
# openai 1.0; the proxy needs openai>=1). /get and /put never touch it: stand in an empty module.
sys.modules["gptcache.adapter.openai"] = types.ModuleType("gptcache.adapter.openai")
from gptcache import cache, Config
from gptcache.manager import manager_factory
from gptcache.processor.pre import get_prompt
from gptcache.similarity_evaluation.distance import SearchDistanceEvaluation
import gptcache_server.server as srv
import uvicorn
from velo_proxy.embedder import OnnxEmbedder
from velo_proxy.settings import Settings
emb = OnnxEmbedder(Settings().embedder_dir, threads=1)
dm = manager_factory("sqlite,faiss", data_dir={data!r}, vector_params={{"dimension": emb.dim}},
                     eviction_params={{"max_size": 10_000_000, "clean_size": 1}})
cache.init(pre_embedding_func=get_prompt, embedding_func=lambda data, **_: emb.embed_sync([data])[0],
           data_manager=dm, similarity_evaluation=SearchDistanceEvaluation(),
           config=Config(similarity_threshold={threshold}))
uvicorn.run(srv.app, host="127.0.0.1", port={port}, log_level="warning")
'''


def start_gptcache(sets: Sets, total: int, workdir: Path) -> Proc:
    """GPTCache's FastAPI server with our embedder, prefilled with the same entries (real + random)."""
    from gptcache.manager import manager_factory

    data = workdir / "gptcache-data"
    data.mkdir(exist_ok=True)
    dm = manager_factory("sqlite,faiss", data_dir=str(data), vector_params={"dimension": DIM},
                         eviction_params={"max_size": 10_000_000, "clean_size": 1})
    rng = np.random.default_rng(1)
    n_fill = max(0, total - len(sets.origins))
    fill = rng.standard_normal((n_fill, DIM)).astype(np.float32)
    fill /= np.linalg.norm(fill, axis=1, keepdims=True)
    questions = list(sets.origins) + [f"filler question {i}" for i in range(n_fill)]
    answers = [answer_for(q)["message"]["content"] for q in questions]
    vecs = np.concatenate([sets.origin_emb, fill]) if n_fill else sets.origin_emb
    for start in range(0, len(questions), 5000):
        dm.import_data(questions[start:start + 5000], answers[start:start + 5000], list(vecs[start:start + 5000]),
                       [None] * len(questions[start:start + 5000]))
    dm.close()
    port = free_port()
    script = workdir / "gptcache_launcher.py"
    # similarity_threshold 0.975 = cosine >= 0.95 on unit vectors (GPTCache: rank = 4 - L2^2 >= 4 t)
    script.write_text(GPTCACHE_LAUNCHER.format(repo=str(REPO), data=str(data), threshold=0.975, port=port))
    log = workdir / "gptcache.log"
    popen = subprocess.Popen([sys.executable, str(script)], cwd=workdir, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    p = Proc("gptcache server", popen, port, log)
    wait_http(p.url + "/", 300, p)
    return p


# ----- scenario --------------------------------------------------------------------------------------------------


def size_label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def scrape(url: str) -> dict[str, float]:
    """The proxy's Prometheus metrics (sums, counts, counters) as a flat dict."""
    import httpx

    out: dict[str, float] = {}
    try:
        text = httpx.get(url + "/metrics", timeout=10.0).text
    except Exception:  # noqa: BLE001
        return out
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith("velo_"):
            continue
        name, _, value = line.rpartition(" ")
        if "_bucket" in name:
            continue
        try:
            out[name] = float(value)
        except ValueError:
            pass
    return out


def breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Mean in-proxy times over one run, from the proxy's own histograms (deltas of _sum / _count)."""
    def mean(prefix: str, labels: str = "") -> float | None:
        n = after.get(prefix + "_count" + labels, 0.0) - before.get(prefix + "_count" + labels, 0.0)
        s = after.get(prefix + "_sum" + labels, 0.0) - before.get(prefix + "_sum" + labels, 0.0)
        return round(1000.0 * s / n, 2) if n > 0 else None

    out: dict[str, Any] = {"embed_ms": mean("velo_embed_seconds"), "search_ms": mean("velo_search_seconds"),
                           "upstream_ms": mean("velo_upstream_seconds")}
    for action in ("A", "B", "exact"):
        out[f"in_proxy_{action}_ms"] = mean("velo_request_seconds", f'{{action="{action}"}}')
    # an A is either a verified semantic hit or a same-question hit (the request's own text cached, e.g. by a
    # fail-open B earlier in the run: served without the verifier); the hit-path targets count the first kind
    for key, metric in (("verified_served", 'velo_verifier_outcomes_total{outcome="served"}'),
                        ("same_question", "velo_same_question_hits_total")):
        out[key] = int(after.get(metric, 0.0) - before.get(metric, 0.0))
    fails = {k: after[k] - before.get(k, 0.0) for k in after
             if k.startswith("velo_component_failures_total") and after[k] - before.get(k, 0.0) > 0}
    if fails:
        out["failures"] = {k.split("{", 1)[1].rstrip("}"): int(v) for k, v in fails.items()}
    return out


def cool_down(res: dict[str, Any]) -> None:
    """A case that tripped a circuit breaker (fail-open, 5 s cool-down) must not leak into the next one."""
    last = res.get("_last_failures")
    if last:
        time.sleep(6.0)
    res["_last_failures"] = None


def bench_proxy(name: str, proxy: Proc, upstream_rows: dict[int, dict[str, Any]] | None, sets: Sets, spec_dir: Path,
                args: argparse.Namespace, miss_offset: list[int]) -> dict[str, Any]:
    url = proxy.url
    res: dict[str, Any] = {"name": name, "rss_after_start_mb": proxy.status().get("VmRSS"), "cases": {}}
    res["policy"] = policy_header(url, sets.paraphrases[0])
    # semantic-hit bodies: the paraphrases this proxy's policy actually serves (a learned policy forwards
    # or augments some of them; those would measure the upstream, not the hit path)
    hit_texts, probe_actions = probe_served(url, sets.paraphrases)
    res["probe"] = {"candidates": len(sets.paraphrases), "served": len(hit_texts), "actions": probe_actions}
    print(f"  [{name}] policy {res['policy']}: serves {len(hit_texts)} of {len(sets.paraphrases)} paraphrases "
          f"{probe_actions}", file=sys.stderr, flush=True)
    if not hit_texts:
        hit_texts = list(sets.paraphrases)
    sem = write_spec(spec_dir / f"{name}-semantic.txt", "/v1/chat/completions", chat_template(), hit_texts)
    ex_texts = hit_texts[: args.exact_bodies]
    res["exact_prime"] = prime_exact(url, ex_texts)
    exact = write_spec(spec_dir / f"{name}-exact.txt", "/v1/chat/completions", chat_template(seeded=False), ex_texts)
    miss = write_spec(spec_dir / f"{name}-miss.txt", "/v1/chat/completions", chat_template(), sets.misses)
    # warm-up (first requests pay lazy imports, thread pools, page faults; the first upstream call
    # initialises litellm's client): a few misses from the far end of the pool, then semantic hits
    res["warmup_misses"] = prime_exact(url, sets.misses[-5:])
    run_wrk(url, sem, connections=4, max_requests=args.warmup, duration_s=30, offset=10**8)
    if args.profile and name == args.profile_config:
        # before the concurrency sweep: at 32 clients bodies fail open and are stored under their own text, and
        # their repeats are then same-question hits (no verifier call), which is not the path to profile
        m0 = scrape(url)
        res["profile"] = profile_proxy(proxy, url, sem, connections=8, seconds=args.profile_seconds,
                                       out=spec_dir / f"profile-{name}", offset=9 * 10**8)
        res["profile"]["kinds"] = breakdown(m0, scrape(url))
    seed_off = 0
    for c in args.concurrency:
        for case, spec in (("semantic hit", sem), ("exact hit", exact)):
            cool_down(res)
            seed_off += 10**6
            m0 = scrape(url)
            r = run_wrk(url, spec, connections=c, max_requests=REQUEST_CAP, duration_s=args.hit_seconds,
                        offset=seed_off)
            r["breakdown"] = breakdown(m0, scrape(url))
            r["load"] = loadavg()
            if case == "semantic hit":
                r["verified_rps"] = r["breakdown"]["verified_served"] / r["seconds"] if r["seconds"] else float("nan")
            res["_last_failures"] = r["breakdown"].get("failures")
            res["cases"].setdefault(case, {})[c] = r
            print(f"  [{name}] {case} c={c}: p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} ms, {r['rps']:.0f}/s, "
                  f"actions {r['actions']}", file=sys.stderr, flush=True)
        cool_down(res)
        m0 = scrape(url)
        r = run_wrk(url, miss, connections=c, max_requests=REQUEST_CAP, duration_s=args.miss_seconds, offset=miss_offset[0])
        time.sleep(1.0)  # let the in-flight requests finish before reading the histograms
        r["breakdown"] = breakdown(m0, scrape(url))
        res["_last_failures"] = r["breakdown"].get("failures")
        miss_offset[0] += r["requests"] + c + 5
        r["load"] = loadavg()
        if upstream_rows and c in upstream_rows:
            r["overhead_p50_ms"] = r["p50_ms"] - upstream_rows[c]["p50_ms"]
            r["overhead_p99_ms"] = r["p99_ms"] - upstream_rows[c]["p99_ms"]
        res["cases"].setdefault("miss", {})[c] = r
        print(f"  [{name}] miss c={c}: p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} ms, {r['rps']:.1f}/s, "
              f"overhead p50 {r.get('overhead_p50_ms', float('nan')):.1f} ms, actions {r['actions']}",
              file=sys.stderr, flush=True)
    for c in args.ttfb_concurrency:
        cool_down(res)
        r = ttfb(url, hit_texts, concurrency=c, n=args.ttfb_requests, seed0=5 * 10**8 + 10**6 * c)
        res["cases"].setdefault("streamed hit TTFB", {})[c] = r
        print(f"  [{name}] streamed TTFB c={c}: p50 {r['ttfb_p50_ms']:.1f} p99 {r['ttfb_p99_ms']:.1f} ms {r['actions']}",
              file=sys.stderr, flush=True)
    if args.profile and name == args.profile_config:
        cool_down(res)
        res["profile_miss"] = profile_proxy(proxy, url, miss, connections=8, seconds=args.profile_seconds,
                                            out=spec_dir / f"profile-miss-{name}", offset=miss_offset[0])
        miss_offset[0] += res["profile_miss"].get("load", {}).get("requests", 0) + 50
    res.pop("_last_failures", None)
    st = proxy.status()
    res["peak_rss_mb"] = st.get("VmHWM")
    res["rss_end_mb"] = st.get("VmRSS")
    return res


def fill_through_proxy(url: str, texts: Sequence[str], concurrency: int) -> dict[str, Any]:
    """Qdrant :memory: lives inside the proxy process: fill it with real requests (each a miss)."""
    import httpx

    async def go() -> dict[str, int]:
        actions: dict[str, int] = {}
        q: asyncio.Queue[str] = asyncio.Queue()
        for t in texts:
            q.put_nowait(t)
        async with httpx.AsyncClient(timeout=60.0) as client:
            async def worker() -> None:
                while not q.empty():
                    t = q.get_nowait()
                    r = await client.post(url + "/v1/chat/completions", json={
                        "model": MODEL, "messages": [{"role": "user", "content": t}], "temperature": 0})
                    a = r.headers.get("x-velo-action", "none")
                    actions[a] = actions.get(a, 0) + 1
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return actions

    t0 = time.time()
    acts = asyncio.run(go())
    return {"requests": len(texts), "seconds": round(time.time() - t0, 1), "actions": acts}


def model_floor(args: argparse.Namespace, n: int = 200) -> dict[str, Any]:
    """The two model calls of a verified semantic hit alone, in this process, one at a time: embed the
    question (1 thread), then verify its top candidates (one batched call): the floor a hit cannot beat."""
    from velo_proxy.embedder import OnnxEmbedder
    from velo_proxy.settings import Settings
    from velo_proxy.verifier import PairVerifier

    settings = Settings()
    embedder = OnnxEmbedder(settings.embedder_dir, threads=1)
    verifier = PairVerifier(settings.verifier_dir, threads=1)
    sets = build_sets(min(args.hit_bodies, n), 0)
    k = int(verifier.calibration.get("top_k", 3))
    times_embed, times_verify = [], []
    for i, (q, origin) in enumerate(zip(sets.paraphrases[:n], sets.origins[:n])):
        t0 = time.perf_counter()
        embedder.embed_sync([q])
        t1 = time.perf_counter()
        verifier.score_sync(q, [origin] * 1)  # one candidate: the usual case above the floor
        t2 = time.perf_counter()
        if i >= 10:  # warm-up
            times_embed.append((t1 - t0) * 1000)
            times_verify.append((t2 - t1) * 1000)
    e, v = np.array(times_embed), np.array(times_verify)
    return {"embed_p50_ms": round(float(np.median(e)), 2), "verify1_p50_ms": round(float(np.median(v)), 2),
            "floor_p50_ms": round(float(np.median(e + v)), 2), "top_k": k, "samples": len(e),
            "verifier_precision": verifier.metadata.get("precision"), "embedder_id": embedder.id}


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.time()
    workdir = Path(tempfile.mkdtemp(prefix="velo-latency-"))
    procs: list[Proc] = []
    result: dict[str, Any] = {"machine": common.machine_info(), "args": {k: v for k, v in vars(args).items()},
                              "configs": {}, "upstream": {}, "notes": []}
    policy = args.policy
    result["policy_requested"] = policy
    delta = args.max_false_hit_rate
    if delta is None and policy == "verified":
        delta = loosest_calibrated_delta()
    result["max_false_hit_rate"] = delta
    if policy == "verified":
        result["model_floor"] = model_floor(args)
        print(f"model floor (embed + verify, in-process): {result['model_floor']}", file=sys.stderr, flush=True)
    try:
        sets = build_sets(args.hit_bodies, args.miss_bodies)
        result["sets"] = {"semantic_bodies": len(sets.paraphrases), "miss_bodies": len(sets.misses),
                          "paraphrase_cosine_p50": float(np.median(sets.para_sim)) if len(sets.para_sim) else None}
        print(f"sets: {result['sets']}", file=sys.stderr, flush=True)
        upstream = start_upstream(args.upstream_latency_ms, workdir)
        procs.append(upstream)
        spec_dir = workdir / "specs"
        spec_dir.mkdir()
        # the floor: the upstream called directly, same bodies as the misses
        direct = write_spec(spec_dir / "direct.txt", "/v1/chat/completions", chat_template(), sets.misses)
        for c in args.concurrency:
            r = run_wrk(upstream.url, direct, connections=c, max_requests=REQUEST_CAP, duration_s=args.miss_seconds,
                        offset=0)
            r["load"] = loadavg()
            result["upstream"][c] = r
            print(f"  upstream direct c={c}: p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} ms, {r['rps']:.1f}/s",
                  file=sys.stderr, flush=True)
        miss_offset = [0]
        for size in args.sizes:
            name = f"embedded-{size_label(size)}"
            data_dir = workdir / f"data-{size}"
            t0 = time.time()
            pre = prefill_embedded(data_dir, sets, size)
            print(f"[{name}] prefilled {pre}", file=sys.stderr, flush=True)
            t1 = time.time()
            proxy = start_proxy(upstream, data_dir, workdir, policy=policy, qdrant=False, max_false_hit_rate=delta)
            procs.append(proxy)
            startup = round(time.time() - t1, 1)
            res = bench_proxy(name, proxy, result["upstream"], sets, spec_dir, args, miss_offset)
            res.update({"store": "embedded", "entries": pre["entries"], "prefill": pre, "startup_s": startup})
            proxy.stop()
            procs.remove(proxy)
            shutil.rmtree(data_dir, ignore_errors=True)
            result["configs"][name] = res
        if args.qdrant_size:
            name = f"qdrant-memory-{size_label(args.qdrant_size)}"
            data_dir = workdir / "data-qdrant"
            t1 = time.time()
            proxy = start_proxy(upstream, data_dir, workdir, policy=policy, qdrant=True, max_false_hit_rate=delta)
            procs.append(proxy)
            startup = round(time.time() - t1, 1)
            fill_texts = list(sets.origins) + [t for t in sets.misses[::-1]][: max(0, args.qdrant_size - len(sets.origins))]
            fill = fill_through_proxy(proxy.url, fill_texts[: args.qdrant_size], concurrency=16)
            print(f"[{name}] filled through the proxy: {fill}", file=sys.stderr, flush=True)
            qargs = argparse.Namespace(**vars(args))
            qargs.concurrency = [c for c in args.concurrency]
            res = bench_proxy(name, proxy, result["upstream"], sets, spec_dir, qargs, miss_offset)
            res.update({"store": "qdrant :memory:", "entries": len(fill_texts[: args.qdrant_size]), "fill": fill,
                        "startup_s": startup})
            proxy.stop()
            procs.remove(proxy)
            result["configs"][name] = res
        if args.gptcache:
            try:
                g = start_gptcache(sets, args.gptcache_size, workdir)
                procs.append(g)
                spec = write_spec(spec_dir / "gptcache.txt", "/get", '{"prompt": @Q@}', sets.paraphrases)
                run_wrk(g.url, spec, connections=1, max_requests=args.warmup // 4, duration_s=30)
                gres: dict[str, Any] = {"entries": args.gptcache_size, "cases": {}}
                for c in args.concurrency:
                    r = run_wrk(g.url, spec, connections=c, max_requests=REQUEST_CAP, duration_s=args.hit_seconds)
                    r["load"] = loadavg()
                    gres["cases"][c] = r
                    print(f"  [gptcache] /get c={c}: p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} ms, {r['rps']:.0f}/s",
                          file=sys.stderr, flush=True)
                gres["peak_rss_mb"] = g.status().get("VmHWM")
                result["gptcache"] = gres
                g.stop()
                procs.remove(g)
            except Exception as exc:  # noqa: BLE001 - report, do not lose the proxy's numbers
                result["gptcache"] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        for p in procs:
            p.stop()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    result["load_end"] = list(os.getloadavg())
    result["seconds"] = round(time.time() - t_start, 1)
    return result


# ----- report ---------------------------------------------------------------------------------------------------------

def _floor_ratio(r: dict[str, Any], result: dict[str, Any]) -> float | None:
    hit, floor = r["cases"]["semantic hit"].get(1, {}).get("p50_ms"), (result.get("model_floor") or {}).get("floor_p50_ms")
    return hit / floor if hit and floor else None


# issue #12's targets with the verifier on: (label, measured(config result, whole result), bound; < 0: at least)
TARGETS = [
    ("verified semantic hit p50 ≤ 10 ms at c=1", lambda r, res: r["cases"]["semantic hit"].get(1, {}).get("p50_ms"), 10.0),
    ("semantic hit p50 at c=1 ≤ 1.3 × the model floor", _floor_ratio, 1.3),
    ("≥ 200 verified hits/s at c=32", lambda r, res: (lambda x: x.get("verified_rps", x.get("rps")))(
        r["cases"]["semantic hit"].get(32, {})), -200.0),
    ("exact hit p99 ≤ 5 ms at c=1", lambda r, res: r["cases"]["exact hit"].get(1, {}).get("p99_ms"), 5.0),
    ("miss overhead p50 ≤ 20 ms (c=8)", lambda r, res: r["cases"]["miss"].get(8, {}).get("overhead_p50_ms"), 20.0),
]


def plot(result: dict[str, Any], img_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    configs = result["configs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    cases = [("semantic hit", "p50_ms"), ("exact hit", "p50_ms")]
    conc = result["args"]["concurrency"]
    ax = axes[0]
    for i, (name, r) in enumerate(configs.items()):
        for case, ls in (("semantic hit", "-"), ("exact hit", "--")):
            rows = r["cases"].get(case, {})
            cs = [c for c in conc if c in rows]
            ax.plot(cs, [rows[c]["p50_ms"] for c in cs], ls, marker="o", color=f"C{i}", label=f"{name} {case} p50")
            ax.plot(cs, [rows[c]["p99_ms"] for c in cs], ls, marker="x", color=f"C{i}", alpha=0.45)
    if "gptcache" in result and "cases" in result["gptcache"]:
        g = result["gptcache"]["cases"]
        cs = [c for c in conc if c in g]
        ax.plot(cs, [g[c]["p50_ms"] for c in cs], ":", marker="s", color="k", label="GPTCache server /get p50")
    ax.axhline(15, color="grey", lw=0.6, ls="--")
    ax.axhline(50, color="grey", lw=0.6, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(conc, [str(c) for c in conc])
    ax.set_xlabel("concurrency")
    ax.set_ylabel("latency (ms), o = p50, x = p99")
    ax.set_title("cache hits")
    ax.legend(fontsize=6.5)
    ax.grid(alpha=0.3, which="both")
    ax = axes[1]
    for i, (name, r) in enumerate(configs.items()):
        rows = r["cases"].get("semantic hit", {})
        cs = [c for c in conc if c in rows]
        ax.plot(cs, [rows[c]["rps"] for c in cs], "-", marker="o", color=f"C{i}", label=f"{name} semantic")
        rows = r["cases"].get("exact hit", {})
        ax.plot(cs, [rows[c]["rps"] for c in cs if c in rows], "--", marker="o", color=f"C{i}", label=f"{name} exact")
    if "gptcache" in result and "cases" in result["gptcache"]:
        g = result["gptcache"]["cases"]
        cs = [c for c in conc if c in g]
        ax.plot(cs, [g[c]["rps"] for c in cs], ":", marker="s", color="k", label="GPTCache server /get")
    ax.axhline(150, color="grey", lw=0.6, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xticks(conc, [str(c) for c in conc])
    ax.set_xlabel("concurrency")
    ax.set_ylabel("requests/s")
    ax.set_title("hit throughput")
    ax.legend(fontsize=6.5)
    ax.grid(alpha=0.3)
    ax = axes[2]
    up = result["upstream"]
    width = 0.8 / (len(configs) + 1)
    xs = np.arange(len(conc))
    ax.bar(xs, [up[c]["p50_ms"] if c in up else 0 for c in conc], width, label="upstream direct p50", color="grey")
    for i, (name, r) in enumerate(configs.items()):
        rows = r["cases"].get("miss", {})
        ax.bar(xs + (i + 1) * width, [rows[c]["p50_ms"] if c in rows else 0 for c in conc], width,
               label=f"{name} miss p50", color=f"C{i}")
    ax.set_xticks(xs + width * len(configs) / 2, [f"c={c}" for c in conc])
    lo = min([up[c]["p50_ms"] for c in conc if c in up] or [0])
    ax.set_ylim(max(0, lo - 50), None)
    ax.set_ylabel("latency p50 (ms)")
    ax.set_title(f"miss vs upstream ({result['args']['upstream_latency_ms']:g} ms fake LLM)")
    ax.legend(fontsize=6.5)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = img_dir / "bench-latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]


def markdown(result: dict[str, Any], command: str) -> str:
    m = result["machine"]
    lines = [f"Measured {m['utc']} UTC on {m['cpu']}, {m['cores']} cores, {m['mem_mb']:,} MB RAM; 1-minute load "
             f"average {m['load_avg'][0]} at the start, {result['load_end'][0]:.2f} at the end (git {m['git'] or '?'}). "
             f"Run time {result['seconds']:.0f} s. Command:\n\n```bash\n{command}\n```\n"]
    pols = sorted({r.get("policy", "?") for r in result["configs"].values()})
    lines.append(f"Proxy policy: requested `VELO_POLICY={result['policy_requested']}`"
                 + (f" at `VELO_MAX_FALSE_HIT_RATE={result['max_false_hit_rate']:g}`" if result.get("max_false_hit_rate") else "")
                 + "; the proxy reported "
                 f"`x-velo-policy: {', '.join(pols)}`. Fake upstream latency {result['args']['upstream_latency_ms']:g} ms. "
                 f"Semantic-hit candidates: {result['sets']['semantic_bodies']:,} QQP paraphrases (median cosine to the "
                 f"cached original {result['sets']['paraphrase_cosine_p50']:.3f}); the policy served "
                 + ", ".join(f"{r['probe']['served']:,} ({name})" for name, r in result["configs"].items() if "probe" in r)
                 + f" of them when probed once, and those are the semantic-hit bodies. Miss bodies: "
                 f"{result['sets']['miss_bodies']:,}.\n")
    if result.get("model_floor"):
        f = result["model_floor"]
        lines.append(f"Model floor of a verified hit (the two model calls alone, in-process, one at a time, "
                     f"{f['samples']} questions): embed {f['embed_p50_ms']:.2f} ms (`{f.get('embedder_id', '?')}`) "
                     f"+ verify one candidate "
                     f"{f['verify1_p50_ms']:.2f} ms ({f['verifier_precision']}) = {f['floor_p50_ms']:.2f} ms p50.\n")
    rows = []
    conc = result["args"]["concurrency"]
    for c in conc:
        u = result["upstream"].get(c)
        if u:
            rows.append(["upstream direct (floor)", "–", c, u["requests"], f"{u['p50_ms']:.1f}", f"{u['p95_ms']:.1f}",
                         f"{u['p99_ms']:.1f}", f"{u['rps']:.1f}", "", ""])
    for name, r in result["configs"].items():
        for case in ("semantic hit", "exact hit", "miss", "streamed hit TTFB"):
            for c, x in sorted(r["cases"].get(case, {}).items()):
                if case == "streamed hit TTFB":
                    rows.append([name, case, c, x["requests"], f"{x['ttfb_p50_ms']:.1f}", f"{x['ttfb_p95_ms']:.1f}",
                                 f"{x['ttfb_p99_ms']:.1f}", "", "", _acts(x["actions"])])
                    continue
                extra = f"{x['overhead_p50_ms']:+.1f} / {x['overhead_p99_ms']:+.1f}" if "overhead_p50_ms" in x else ""
                did = _acts(x["actions"]) + (f", {x['errors']} errors" if x["errors"] else "")
                if case == "semantic hit" and "verified_rps" in x:
                    b = x["breakdown"]
                    did += (f" (A: {b['verified_served']} verified, {b['same_question']} same question; "
                            f"{x['verified_rps']:.1f} verified/s)")
                rows.append([name, case, c, x["requests"], f"{x['p50_ms']:.1f}", f"{x['p95_ms']:.1f}", f"{x['p99_ms']:.1f}",
                             f"{x['rps']:.1f}", extra, did])
    if "gptcache" in result and "cases" in result["gptcache"]:
        for c, x in sorted(result["gptcache"]["cases"].items()):
            rows.append([f"GPTCache server {size_label(result['gptcache']['entries'])}", "POST /get (lookup only)", c,
                         x["requests"], f"{x['p50_ms']:.1f}", f"{x['p95_ms']:.1f}", f"{x['p99_ms']:.1f}", f"{x['rps']:.1f}",
                         "", f"{x['errors']} errors" if x["errors"] else ""])
    lines.append(md_table(["config", "case", "c", "requests", "p50 ms", "p95 ms", "p99 ms", "req/s",
                           "miss overhead p50 / p99 ms", "what the proxy did"], rows))
    lines.append("\nPercentiles are wrk's, which corrects for coordinated omission: one request that stalls for "
                 "100 ms at c=1 also counts as the ~100 requests a client at the run's mean rate would have sent "
                 "meanwhile, so a handful of stalls shows in the p99 (the slowest single request of each run is "
                 "`max_ms` in latency.json). A semantic-hit run's A is a verified hit or a same-question hit: a body "
                 "that failed open (B) earlier is stored under its own text, and its repeats are then served without "
                 "the verifier (`scope.same_question`); the last column splits them, and the hits/s target counts "
                 "verified hits only.\n")
    brow = []
    for name, r in result["configs"].items():
        for case in ("semantic hit", "exact hit", "miss"):
            for c, x in sorted(r["cases"].get(case, {}).items()):
                bd = x.get("breakdown") or {}
                inproc = bd.get("in_proxy_A_ms") if case == "semantic hit" else (
                    bd.get("in_proxy_exact_ms") if case == "exact hit" else bd.get("in_proxy_B_ms"))
                brow.append([name, case, c, _f(bd.get("embed_ms")), _f(bd.get("search_ms")), _f(inproc),
                             _f(bd.get("upstream_ms")) if case == "miss" else "",
                             _f(inproc - bd["upstream_ms"]) if case == "miss" and inproc and bd.get("upstream_ms") else "",
                             ", ".join(f"{k} {v}" for k, v in (bd.get("failures") or {}).items())])
    lines.append("\n**Where the time goes** (means over each run from the proxy's own histograms: embedding incl. "
                 "queueing for the micro-batcher, vector search, request handling inside the app; the rest of the "
                 "client-side latency is HTTP parsing/serialisation in uvicorn and the socket round trip)\n")
    lines.append(md_table(["config", "case", "c", "embed ms", "search ms", "in-app ms", "upstream ms",
                           "in-app minus upstream ms", "fail-open events"], brow))
    lines.append("\n**Memory and start-up**\n")
    mrows = [[name, r.get("store"), f"{r.get('entries', 0):,}", r.get("startup_s"), r.get("rss_after_start_mb"),
              r.get("peak_rss_mb")] for name, r in result["configs"].items()]
    if "gptcache" in result and "peak_rss_mb" in result["gptcache"]:
        g = result["gptcache"]
        mrows.append(["GPTCache server", "sqlite + faiss", f"{g['entries']:,}", "", "", g["peak_rss_mb"]])
    lines.append(md_table(["config", "store", "entries", "start-up s", "RSS after start MB", "peak RSS (VmHWM) MB"], mrows))
    lines.append("\n**Targets** (2 cores)\n")
    trows = []
    for name, r in result["configs"].items():
        for label, get, bound in TARGETS:
            v = get(r, result)
            if v is None:
                continue
            ok = v >= -bound if bound < 0 else v <= bound
            trows.append([name, label, f"{v:.1f}", "met" if ok else "**missed**"])
        if r.get("entries", 0) >= 100_000 and r.get("peak_rss_mb"):
            trows.append([name, "100k entries in ≤ 1.5 GB", f"{r['peak_rss_mb']} MB",
                          "met" if r["peak_rss_mb"] <= 1536 else "**missed**"])
    lines.append(md_table(["config", "target", "measured", ""], trows))
    for name, r in result["configs"].items():
        for key, what in (("profile", "semantic hits"), ("profile_miss", "misses")):
            p = r.get(key)
            if p and "top_inclusive" in p:
                lines.append(f"\n**Profile** ({name}, {what} at c=8, py-spy {p['samples']} samples over all threads)\n")
                kinds = p.get("kinds") or {}
                split = (f"; A: {kinds['verified_served']} verified, {kinds['same_question']} same question"
                         if "verified_served" in kinds else "")
                lines.append(f"Load during the profile: {p['load']['requests']} requests in {p['load']['seconds']} s "
                             f"({p['load']['rps']:.0f}/s{split}), p50 {p['load']['p50_ms']:.1f} ms, p99 {p['load']['p99_ms']:.1f} ms "
                             "(py-spy itself slows the process a little). ms/request = thread time spent in the function "
                             "per request served, summed over threads.\n")
                lines.append(md_table(["function (inclusive)", "% of samples", "ms / request"],
                                      [[f"`{k}`", v, ms] for k, v, ms in p["top_inclusive"][:18]]))
                lines.append("")
                lines.append(md_table(["function (self)", "% of samples", "ms / request"],
                                      [[f"`{k}`", v, ms] for k, v, ms in p["top_self"][:15]]))
    lines.append("\n![latency](img/bench-latency.png)\n")
    return "\n".join(lines)


def _f(v: Any) -> str:
    return "–" if v is None else f"{v:.1f}"


def _acts(a: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in a.items() if v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--upstream-latency-ms", type=float, default=500.0)
    ap.add_argument("--hit-bodies", type=int, default=2000)
    ap.add_argument("--miss-bodies", type=int, default=6000)
    ap.add_argument("--exact-bodies", type=int, default=200)
    ap.add_argument("--hit-seconds", type=float, default=10, help="length of each hit run (wrk -d)")
    ap.add_argument("--miss-seconds", type=float, default=15, help="length of each miss / upstream run")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--ttfb-concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--ttfb-requests", type=int, default=300)
    ap.add_argument("--qdrant-size", type=int, default=1000, help="0: skip the Qdrant :memory: run")
    ap.add_argument("--no-gptcache", dest="gptcache", action="store_false")
    ap.add_argument("--gptcache-size", type=int, default=10_000)
    ap.add_argument("--policy", choices=("verified", "threshold", "learned"), default="verified",
                    help="the proxy's VELO_POLICY (default: the proxy's own default)")
    ap.add_argument("--max-false-hit-rate", type=float, default=None,
                    help="the proxy's VELO_MAX_FALSE_HIT_RATE (default for 'verified': the loosest bound its "
                         "calibration holds, so that verified hits are served and timed)")
    ap.add_argument("--profile", action="store_true", help="py-spy the proxy during semantic hits at c=8")
    ap.add_argument("--profile-config", default="embedded-100k")
    ap.add_argument("--profile-seconds", type=int, default=20)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="datasets directory (default: env VELO_DATASETS_DIR, else ../shared/data)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, specs, profiles)")
    ap.add_argument("--json", type=Path, default=CACHE_DIR / "latency.json")
    ap.add_argument("--doc", type=Path, default=DOCS / "benchmarks.md")
    ap.add_argument("--img-dir", type=Path, default=IMG)
    ap.add_argument("--no-doc", dest="write_doc", action="store_false")
    args = ap.parse_args(argv)
    common.set_data_dir(args.data_dir)
    if args.tiny:
        args.sizes, args.concurrency, args.upstream_latency_ms = [2000], [1, 4], 50.0
        args.hit_bodies, args.miss_bodies, args.exact_bodies = 100, 200, 20
        args.hit_seconds, args.miss_seconds, args.warmup = 3, 3, 20
        args.ttfb_concurrency, args.ttfb_requests, args.qdrant_size = [2], 20, 150
        args.gptcache_size = 1000
    command = "python benchmarks/latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = evaluate(args)
    common.write_json(args.json, result)
    print(f"results: {args.json}", file=sys.stderr)
    from quality import write_section

    if args.write_doc:
        plot(result, args.img_dir)
        write_section(args.doc, "latency", markdown(result, command.strip()))
        print(f"doc: {args.doc}", file=sys.stderr)
    else:
        print(markdown(result, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
