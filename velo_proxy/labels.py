"""Where judged pairs (``velo_proxy.judging.Label``) are kept: a Redis stream when the proxy has Redis
(shared by every proxy and read by the retrain job), else a JSONL file in the data directory. The live
guard rebuilds its state from the most recent labels at start, so it survives a restart."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import deque
from pathlib import Path
from typing import Any, Iterable

from velo_proxy.judging import Label

log = logging.getLogger("velo_proxy.labels")

LABELS_STREAM = "velo:labels"
LABELS_FILE = "labels.jsonl"


class FileLabelStore:
    """Append-only JSONL. Past ``max_len * 2`` lines the file is rewritten with its newest ``max_len``."""

    def __init__(self, path: Path, *, max_len: int) -> None:
        self.path = Path(path)
        self.max_len = max_len
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lines = sum(1 for _ in self.path.open(encoding="utf-8")) if self.path.exists() else 0
        self._lock = asyncio.Lock()

    @property
    def name(self) -> str:
        return f"file:{self.path}"

    def _append(self, line: str) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._lines += 1
        if self._lines > 2 * self.max_len:
            keep = self._tail(self.max_len)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
            os.replace(tmp, self.path)
            self._lines = len(keep)

    def _tail(self, n: int) -> list[str]:
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as f:
            return [line.rstrip("\n") for line in deque(f, maxlen=n) if line.strip()]

    async def append(self, label: Label) -> None:
        line = json.dumps(label.to_json(), ensure_ascii=False, separators=(",", ":"))
        async with self._lock:
            await asyncio.to_thread(self._append, line)

    async def recent(self, n: int) -> list[Label]:
        """The newest ``n`` labels, oldest first."""
        lines = await asyncio.to_thread(self._tail, n)
        return list(_parse(lines))

    async def aclose(self) -> None:
        return None


class RedisLabelStore:
    def __init__(self, redis: Any, *, max_len: int, key: str = LABELS_STREAM) -> None:
        self.redis = redis
        self.max_len = max_len
        self.key = key

    @property
    def name(self) -> str:
        return f"redis:{self.key}"

    async def append(self, label: Label) -> None:
        await self.redis.xadd(self.key, {"label": json.dumps(label.to_json(), ensure_ascii=False)},
                              maxlen=self.max_len, approximate=True)

    async def recent(self, n: int) -> list[Label]:
        rows = await self.redis.xrevrange(self.key, count=n)
        return list(_parse(fields.get("label", "") for _, fields in reversed(rows)))

    async def aclose(self) -> None:
        return None


def _parse(lines: Iterable[str]) -> Iterable[Label]:
    for line in lines:
        try:
            yield Label.from_json(json.loads(line))
        except (ValueError, TypeError) as exc:  # a torn last line after a crash: skip it
            log.warning("skipping an unreadable label: %s", exc)


def read_label_file(path: Path) -> list[Label]:
    """Every label of a JSONL file (the retrain job's reader; the Redis stream is read with ``read_label_stream``)."""
    with Path(path).open(encoding="utf-8") as f:
        return list(_parse(line for line in f if line.strip()))


def read_label_stream(redis_url: str, *, key: str = LABELS_STREAM) -> list[Label]:
    """Every label of the Redis stream (synchronous client: the retrain job is a batch job)."""
    import redis

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return list(_parse(fields.get("label", "") for _, fields in client.xrange(key)))
    finally:
        client.close()


LabelStore = FileLabelStore | RedisLabelStore
