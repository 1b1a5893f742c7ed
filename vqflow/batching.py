"""Micro-batching for a server: single items from concurrent requests are scored together.

BentoML's own adaptive batching serves one ``batchable`` endpoint whose only argument is the batch; the service
needs one batch shared by two endpoints (/predict with per-request category and map options, /predict_batch),
so it queues items here. A batch starts as soon as the scorer is free and takes what is queued, up to
``max_batch_size``, waiting at most ``max_latency_ms`` for more: a lone request pays that wait at most, and
under load batches fill while the previous one runs. With ``workers`` > 1 that many batches run at once (on a
CPU, each with a share of the cores: better than one batch over all cores, whose threads wait for each other).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Callable, Sequence


class MicroBatcher:
    """``await batcher.submit(items)`` -> results in order; ``score(list of items) -> list`` runs in a thread,
    at most ``workers`` batches at a time."""

    RECENT = 1024  # batch sizes kept

    def __init__(
        self,
        score: Callable[[list[Any]], Sequence[Any]],
        max_batch_size: int = 16,
        max_latency_ms: float = 10.0,
        workers: int = 1,
    ):
        if max_batch_size < 1 or max_latency_ms < 0 or workers < 1:
            raise ValueError(
                f"max_batch_size and workers must be >= 1 and max_latency_ms >= 0 "
                f"(got {max_batch_size}, {workers}, {max_latency_ms})"
            )
        self.score, self.max_batch_size, self.max_latency = score, int(max_batch_size), max_latency_ms / 1000
        self.workers = int(workers)
        self.batch_sizes: deque[int] = deque(maxlen=self.RECENT)  # of the latest batches (a server runs for months)
        self._queue: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []

    async def submit(self, items: Sequence[Any]) -> list[Any]:
        loop = asyncio.get_running_loop()
        if self._queue is None:  # created in the server's event loop, on first use
            self._queue = asyncio.Queue()
            self._tasks = [loop.create_task(self._run()) for _ in range(self.workers)]
        futures = [loop.create_future() for _ in items]
        for item, future in zip(items, futures):
            self._queue.put_nowait((item, future))
        return list(await asyncio.gather(*futures))

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_latency
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            live = [(item, future) for item, future in batch if not future.done()]  # a cancelled request drops out
            if not live:
                continue
            self.batch_sizes.append(len(live))
            try:
                results = await asyncio.to_thread(self.score, [item for item, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"scorer returned {len(results)} results for {len(live)} items")
            except Exception as exc:  # the whole batch failed: every waiting request gets the error
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(live, results):
                if not future.done():
                    future.set_result(result)
