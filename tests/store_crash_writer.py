"""Helper of tests/test_store_conformance.py: writes entries into an EmbeddedStore in a loop until killed.

Usage: python tests/store_crash_writer.py PATH DIM ANN_THRESHOLD RUN_TAG

Every entry is reproducible from its id (the test recomputes it after the crash): the vector comes from a
generator seeded with the id, the question is ``q-<id>``, and the answer names the batch and its size so
the test can check that each ``add`` landed whole or not at all. After each committed ``add`` the writer
prints ``<batch> <total entries written>`` as one
``write`` to the pipe (atomic below PIPE_BUF), so a kill never leaves half a line.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from velo_proxy.store.base import CacheEntry  # noqa: E402
from velo_proxy.store.embedded import EmbeddedStore  # noqa: E402


def vector_for(entry_id: str, dim: int) -> np.ndarray:
    v = np.random.default_rng(int(entry_id[:16], 16)).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def entry_for(entry_id: str, dim: int, batch: int, size: int, run: str) -> CacheEntry:
    return CacheEntry(
        scope=f"scope-{int(entry_id[:2], 16) % 3}",
        vector=vector_for(entry_id, dim),
        question=f"q-{entry_id}",
        answer={"message": {"role": "assistant", "content": "x" * 900 + entry_id},
                "finish_reason": "stop", "usage": {"total_tokens": 7}, "run": run, "batch": batch, "batch_size": size},
        model="m",
        expires_at=time.time() + 3600,
        id=entry_id,
    )


def main() -> None:
    path, dim, ann_threshold, run = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    store = EmbeddedStore(path, dim=dim, ann_threshold=ann_threshold)
    rng = np.random.default_rng()
    total = len(store)
    batch = 0
    while True:
        batch += 1
        size = int(rng.integers(1, 9))
        store.add([entry_for(uuid.uuid4().hex, dim, batch, size, run) for _ in range(size)])
        total += size
        os.write(1, f"{batch} {total}\n".encode())  # print() writes each field apart
        if batch % 40 == 0:
            store.checkpoint()  # leaves ANN snapshots that are stale by the time of the kill


if __name__ == "__main__":
    main()
