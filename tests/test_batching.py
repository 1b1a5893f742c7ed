"""The service's micro-batcher: concurrent submissions share batches, results keep their order, errors reach
every waiting request, and a lone request is not held longer than the latency bound."""

import asyncio
import threading
import time

import pytest

from vqflow.batching import MicroBatcher


def test_concurrent_requests_share_batches_and_get_their_own_results():
    gate = threading.Event()

    def score(items):
        gate.wait(5)  # the first batch blocks until every request is queued
        return [item * 10 for item in items]

    async def main():
        batcher = MicroBatcher(score, max_batch_size=4, max_latency_ms=0)
        first = asyncio.create_task(batcher.submit([0]))
        await asyncio.sleep(0.05)
        rest = [asyncio.create_task(batcher.submit([i, i + 100])) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        gate.set()
        return await first, await asyncio.gather(*rest), batcher.batch_sizes

    first, rest, sizes = asyncio.run(main())
    assert first == [0]
    assert rest == [[10 * i, 10 * (i + 100)] for i in range(1, 6)]
    assert sizes[0] == 1 and max(sizes) == 4 and sum(sizes) == 11  # the 10 queued items went in batches of <= 4


def test_a_failing_batch_fails_each_of_its_requests_and_the_batcher_keeps_working():
    calls = []

    def score(items):
        calls.append(list(items))
        if "bad" in items:
            raise RuntimeError("model exploded")
        return items

    async def main():
        batcher = MicroBatcher(score, max_batch_size=8, max_latency_ms=50)
        results = await asyncio.gather(batcher.submit(["a"]), batcher.submit(["bad"]), return_exceptions=True)
        return results, await batcher.submit(["after"])

    results, after = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "exploded" in str(r) for r in results)
    assert calls[0] == ["a", "bad"] and after == ["after"]


def test_a_lone_request_waits_at_most_the_latency_bound():
    async def main():
        batcher = MicroBatcher(lambda items: items, max_batch_size=16, max_latency_ms=30)
        started = time.perf_counter()
        await batcher.submit(["x"])
        return time.perf_counter() - started

    assert asyncio.run(main()) < 0.5


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(lambda items: items, max_batch_size=0)


def test_with_two_workers_two_batches_run_at_once():
    both_running = threading.Barrier(2, timeout=5)  # breaks (raises) unless two score calls overlap

    def score(items):
        both_running.wait()
        return items

    async def main():
        batcher = MicroBatcher(score, max_batch_size=2, max_latency_ms=0, workers=2)
        return await asyncio.gather(batcher.submit(["a", "b"]), batcher.submit(["c", "d"]))

    assert asyncio.run(main()) == [["a", "b"], ["c", "d"]]


def test_the_batcher_keeps_a_bounded_record_of_batch_sizes():
    async def main():
        batcher = MicroBatcher(lambda items: items, max_batch_size=1, max_latency_ms=0)
        for i in range(MicroBatcher.RECENT + 50):
            await batcher.submit([i])
        return batcher.batch_sizes

    sizes = asyncio.run(main())
    assert len(sizes) == MicroBatcher.RECENT and set(sizes) == {1}  # a long-running server's memory stays flat
