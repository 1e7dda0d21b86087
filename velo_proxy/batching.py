"""Micro-batching of concurrent model calls: the embedder's and the pair verifier's request path.

``MicroBatcher`` serves concurrent ``submit(items)`` calls through one background task that gathers
them into micro-batches (up to ``max_items`` items, waiting at most ``wait_s`` for company) and runs
each batch with one ``infer(items)`` call on one dedicated worker thread, so the event loop never
blocks on inference and two requests never fight over the CPU. Under load batches form on their own:
while one batch runs, the next callers queue up and go together into the next one.

``infer`` gets the items of a batch in order and returns an array whose rows (first axis) are aligned
with them; every caller gets its own rows back. Callers bound their own wait with
``asyncio.wait_for``; a caller that gave up (cancelled, timed out) before its batch ran is skipped.
A batch whose ``infer`` raises fails its callers with ``error`` and the batcher keeps serving; callers
still waiting when the batcher is closed (``aclose``, or ``close`` from synchronous code) get
``error`` too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Job(Generic[T]):
    items: list[T]
    future: asyncio.Future[np.ndarray]


class MicroBatcher(Generic[T]):
    """One background task and one worker thread that run concurrent callers' items in micro-batches.

    ``name`` names the thread (``velo-<name>``), the task and the error messages ("<name> closed").
    The batcher starts on the first ``submit`` (or ``start``) on the running event loop; started on
    another loop, it is moved to the current one. ``aclose`` stops it; a later ``submit`` starts it again.
    """

    def __init__(
        self,
        infer: Callable[[list[T]], np.ndarray],
        *,
        max_items: int,
        wait_s: float,
        name: str,
        error: type[Exception] = RuntimeError,
    ) -> None:
        self.infer = infer
        self.max_items = max(1, int(max_items))
        self.wait_s = max(0.0, float(wait_s))
        self.name = name
        self.error = error
        # Counters (read by tests, benchmarks and metrics).
        self.batches_run = 0
        self.items_run = 0
        self.cancelled_skipped = 0
        self._queue: asyncio.Queue[_Job[T]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def running(self) -> bool:
        """Whether the background task is alive (on the loop it was started on)."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.running and self._loop is loop:
            return
        if self._task is not None:
            await self.aclose()
        self._loop = loop
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"velo-{self.name}")
        self._task = loop.create_task(self._batcher(), name=f"velo-{self.name}-batcher")

    async def aclose(self) -> None:
        """Stop the task and the thread; callers still waiting get ``error``. Idempotent."""
        task = self._stop()
        if task is not None:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    def close(self) -> None:
        """``aclose`` without waiting for the cancelled task to finish (for synchronous callers)."""
        self._stop()

    def _stop(self) -> asyncio.Task[None] | None:
        """Cancel the task, fail the queued callers, release the thread; the task if it runs on this loop."""
        task, self._task = self._task, None
        queue, self._queue = self._queue, None
        if task is not None:
            try:
                current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                current = None
            if task.get_loop() is current:
                self._cancel(task, queue)
            else:
                # Started on another (possibly closed) event loop: its task and queue die with it.
                try:
                    task.get_loop().call_soon_threadsafe(self._cancel, task, queue)
                except RuntimeError:
                    pass
                task = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        return task

    def _cancel(self, task: asyncio.Task[None], queue: asyncio.Queue[_Job[T]] | None) -> None:
        task.cancel()  # its batch in flight and the callers it holds get the error (``_batcher``, ``_run``)
        while queue is not None and not queue.empty():
            self._fail([queue.get_nowait()], "closed")

    async def submit(self, items: Sequence[T]) -> np.ndarray:
        """``infer``'s rows for ``items``, computed in a batch with other callers' items."""
        if not self.running or self._loop is not asyncio.get_running_loop():
            await self.start()
        assert self._queue is not None
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(list(items), future))
        return await future

    async def _batcher(self) -> None:
        assert self._queue is not None and self._executor is not None
        queue, executor, loop = self._queue, self._executor, asyncio.get_running_loop()
        held: list[_Job[T]] = []  # taken off the queue, not yet answered
        try:
            while True:
                held = [await queue.get()]
                count = len(held[0].items)
                deadline = loop.time() + self.wait_s
                while count < self.max_items:
                    if queue.empty():
                        remaining = deadline - loop.time()
                        if remaining <= 0:
                            break
                        try:
                            job = await asyncio.wait_for(queue.get(), remaining)
                        except asyncio.TimeoutError:
                            break
                    else:
                        job = queue.get_nowait()
                    if count + len(job.items) > self.max_items and count > 0:
                        # Does not fit: run it first thing in the next batch.
                        jobs, held = held, [job]
                        await self._run(jobs, executor, loop)
                        count = len(job.items)
                        deadline = loop.time() + self.wait_s
                        continue
                    held.append(job)
                    count += len(job.items)
                jobs, held = held, []
                await self._run(jobs, executor, loop)  # answers (or fails) its own callers, cancelled or not
        finally:
            # Cancelled (closed) while holding callers: they get the error rather than wait forever.
            self._fail(held, "closed")

    async def _run(self, jobs: list[_Job[T]], executor: ThreadPoolExecutor, loop: asyncio.AbstractEventLoop) -> None:
        live = [j for j in jobs if not j.future.done()]  # callers that gave up are skipped
        self.cancelled_skipped += len(jobs) - len(live)
        if not live:
            return
        items = [x for j in live for x in j.items]
        try:
            rows = await loop.run_in_executor(executor, self.infer, items)
        except asyncio.CancelledError:
            self._fail(live, "closed")
            raise
        except Exception as exc:  # fail the callers, keep serving
            log.warning("%s batch of %d items failed: %s", self.name, len(items), exc)
            self._fail(live, f"failed: {exc}")
            return
        self.batches_run += 1
        self.items_run += len(items)
        offset = 0
        for j in live:
            n = len(j.items)
            if not j.future.done():
                j.future.set_result(rows[offset : offset + n])
            offset += n

    def _fail(self, jobs: list[_Job[Any]], what: str) -> None:
        for j in jobs:
            if not j.future.done():
                j.future.set_exception(self.error(f"{self.name} {what}"))
