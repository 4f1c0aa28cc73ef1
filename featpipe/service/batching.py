"""Concurrent requests gathered into one forward pass: a bounded queue and one worker.

Each request puts its photos on the queue and awaits their answers. The worker takes the first waiting photo,
then whatever else arrives within `window` seconds, up to `max_batch` photos, and runs them as one batch in
a single thread (the model runs one batch at a time; the event loop keeps accepting meanwhile). A full
queue refuses at once (`Overloaded`: the service answers 503) rather than letting waits grow without
bound; a request whose answer takes longer than `timeout` gets `TimeoutError` (504), and its photos are
dropped if they have not started.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


class Overloaded(Exception):
    """The queue is full: the caller should answer 503 and let the client retry later."""


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    largest: int = 0
    busy_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"batches": self.batches, "items": self.items, "largest": self.largest,
                "mean_batch": round(self.items / self.batches, 2) if self.batches else 0.0,
                "busy_seconds": round(self.busy_seconds, 3)}


class MicroBatcher:
    """run(items) -> one result per item, called in one worker thread with up to `max_batch` items at a time."""

    def __init__(self, run: Callable[[list[Any]], Sequence[Any]], max_batch: int = 16, window: float = 0.005,
                 max_queue: int = 256, timeout: float = 30.0):
        if max_batch < 1 or max_queue < 1 or window < 0 or timeout <= 0:
            raise ValueError("max_batch and max_queue must be at least 1, window at least 0 and timeout above 0")
        self.run, self.max_batch, self.window, self.timeout = run, max_batch, window, timeout
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="featpipe-batch")

    @property
    def pending(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        self._queue = asyncio.Queue(self.max_queue)
        self._worker = asyncio.create_task(self._work())

    async def stop(self) -> None:
        """Finish what is queued, then stop the worker."""
        if self._worker is None:
            return
        await self._queue.join()
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass
        self._thread.shutdown(wait=True)

    async def submit(self, items: Sequence[Any]) -> list[Any]:
        """The results of `items`, in order. Raises Overloaded when the queue has no room for all of them and
        TimeoutError past `timeout`; an exception raised by `run` is raised here."""
        if self._queue is None:
            raise RuntimeError("start() the batcher first")
        if self.max_queue - self._queue.qsize() < len(items):
            raise Overloaded(f"{self._queue.qsize()} photos are waiting (at most {self.max_queue})")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        for item, fut in zip(items, futures):
            self._queue.put_nowait((item, fut))
        try:
            return list(await asyncio.wait_for(asyncio.gather(*futures), self.timeout))
        except asyncio.TimeoutError:
            for fut in futures:
                fut.cancel()
            raise TimeoutError(f"no answer within {self.timeout:g} s") from None

    async def _take(self) -> list[tuple[Any, asyncio.Future]]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.window
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                batch.append(self._queue.get_nowait() if left <= 0 else await asyncio.wait_for(self._queue.get(), left))
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._take()
            live = [(item, fut) for item, fut in batch if not fut.done()]  # timed-out requests are dropped
            try:
                if live:
                    started = time.perf_counter()
                    results = await loop.run_in_executor(self._thread, self.run, [item for item, _ in live])
                    self._count(len(live), time.perf_counter() - started)
                    for (_, fut), result in zip(live, results):
                        if not fut.done():
                            fut.set_result(result)
            except Exception as exc:  # the batch failed: every request in it hears why
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _count(self, n: int, seconds: float) -> None:
        s = self.stats
        s.batches, s.items, s.largest = s.batches + 1, s.items + n, max(s.largest, n)
        s.busy_seconds += seconds
