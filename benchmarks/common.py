"""Shared helpers of the quality and latency benchmarks (benchmarks/quality.py, benchmarks/latency.py).

- paths: the repository, the evaluation datasets (``require_data()``: the setting ``VELO_DATASETS_DIR`` or a
  benchmark's ``--data-dir``, default ``<repo>/../shared/data``) and the on-disk embedding cache
  (``~/.cache/velo-proxy/bench/``, outside the repo);
- ``EmbeddingCache``: embeddings of benchmark texts keyed by sha256(text) in one SQLite file per
  embedder id, so a rerun embeds nothing it has seen before;
- ``machine_info()``: what the numbers were measured on (CPU, cores, load, RAM, versions);
- percentile and table helpers.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CACHE_DIR = Path(os.environ.get("VELO_BENCH_CACHE", Path.home() / ".cache" / "velo-proxy" / "bench"))
DOCS = REPO / "docs"
IMG = DOCS / "img"


def set_data_dir(path: Path | None) -> None:
    """``--data-dir`` of a benchmark: the same setting as training's (env ``VELO_DATASETS_DIR``)."""
    from policy.data import DATASETS_ENV

    if path is not None:
        os.environ[DATASETS_ENV] = str(path)


def require_data() -> Path:
    """The datasets directory (``policy.data.data_dir``: ``--data-dir`` / ``VELO_DATASETS_DIR``, default
    ``../shared/data``); exits with a message naming the setting when it is missing."""
    from policy.data import DatasetsMissing, data_dir

    try:
        return data_dir()
    except DatasetsMissing as exc:
        raise SystemExit(f"evaluation data not found: {exc}") from None


# ----- embeddings ---------------------------------------------------------------------------------


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Embeddings of texts, cached on disk by sha256(text) per embedder id."""

    def __init__(self, embedder: Any, cache_dir: Path = CACHE_DIR) -> None:
        self.embedder = embedder
        cache_dir.mkdir(parents=True, exist_ok=True)
        safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(embedder.id))
        self.path = cache_dir / f"embeddings-{safe_id}-{embedder.dim}.sqlite3"
        self.conn = sqlite3.connect(self.path)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS emb (k TEXT PRIMARY KEY, v BLOB NOT NULL)")
        self.embedded_now = 0

    def get(self, texts: Sequence[str], *, batch: int = 64, progress: str = "") -> np.ndarray:
        dim = int(self.embedder.dim)
        keys = [text_key(t) for t in texts]
        out = np.zeros((len(texts), dim), dtype=np.float32)
        found: dict[str, np.ndarray] = {}
        uniq = list(dict.fromkeys(keys))
        for start in range(0, len(uniq), 900):
            chunk = uniq[start:start + 900]
            q = "SELECT k, v FROM emb WHERE k IN (%s)" % ",".join("?" * len(chunk))
            for k, v in self.conn.execute(q, chunk):
                found[k] = np.frombuffer(v, dtype=np.float32)
        missing: dict[str, str] = {}
        for k, t in zip(keys, texts):
            if k not in found and k not in missing:
                missing[k] = t
        if missing:
            mk, mt = list(missing), list(missing.values())
            t0 = time.time()
            step = 2048
            for start in range(0, len(mt), step):
                vecs = self.embedder.embed_sync(mt[start:start + step], batch_size=batch)
                rows = [(k, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for k, v in zip(mk[start:start + step], vecs)]
                with self.conn:
                    self.conn.executemany("INSERT OR REPLACE INTO emb (k, v) VALUES (?, ?)", rows)
                for k, v in zip(mk[start:start + step], vecs):
                    found[k] = v
                done = min(start + step, len(mt))
                rate = done / max(time.time() - t0, 1e-9)
                print(f"  embedding {progress}: {done}/{len(mt)} new texts ({rate:.0f}/s)", file=sys.stderr, flush=True)
            self.embedded_now += len(mt)
        for i, k in enumerate(keys):
            out[i] = found[k]
        return out


def load_embedder(threads: int = 1) -> Any:
    from velo_proxy.embedder import OnnxEmbedder
    from velo_proxy.settings import Settings

    return OnnxEmbedder(Settings().embedder_dir, threads=threads)


# ----- statistics ---------------------------------------------------------------------------------


def pct(values: Iterable[float], q: float) -> float:
    arr = np.asarray(list(values), dtype=np.float64)
    return float(np.percentile(arr, q)) if arr.size else float("nan")


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v:
                return "–"
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(v) for v in r) + " |")
    return "\n".join(lines)


# ----- environment --------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _pkg_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return "not installed"


def machine_info() -> dict[str, Any]:
    mem_total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_total = int(line.split()[1]) // 1024
    except OSError:
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        rev = ""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "mem_mb": mem_total,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "os": platform.platform(),
        "git": rev,
        "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "versions": {p: _pkg_version(p) for p in ("numpy", "onnxruntime", "usearch", "qdrant-client",
                                                    "gptcache", "faiss-cpu", "uvicorn", "fastapi", "litellm")},
    }


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))
