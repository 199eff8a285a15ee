"""Adaptive batching (service/batching.py, BentoML's dispatcher) without a server."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.batching import AdaptiveBatcher, Overloaded


def run_all(batcher: AdaptiveBatcher, parts: list[np.ndarray]) -> list[np.ndarray]:
    async def main():
        return await asyncio.gather(*(batcher(p) for p in parts))
    return asyncio.run(main())


def test_concurrent_calls_are_merged_and_answered_in_order():
    sizes = []

    def run(x: np.ndarray) -> np.ndarray:
        time.sleep(0.005)  # a model run long enough for the queue to fill behind it
        return x * 10.0

    batcher = AdaptiveBatcher(run, max_batch_size=64, max_latency_ms=5000, on_batch=sizes.append)
    parts = [np.full((1 + i % 3, 2), float(i)) for i in range(60)]
    answers = run_all(batcher, parts)
    for part, answer in zip(parts, answers, strict=True):
        np.testing.assert_array_equal(answer, part * 10.0)
    assert sum(sizes) == sum(len(p) for p in parts)
    assert max(sizes) > 3, f"no call was merged with another: {sizes}"
    assert max(sizes) <= 64


def test_max_batch_size_splits_a_large_request():
    sizes = []
    batcher = AdaptiveBatcher(lambda x: x + 1, max_batch_size=4, max_latency_ms=5000, on_batch=sizes.append)
    [answer] = run_all(batcher, [np.arange(10.0)[:, None]])
    np.testing.assert_array_equal(answer[:, 0], np.arange(10.0) + 1)
    assert max(sizes) <= 4


def test_an_error_in_the_model_reaches_the_caller():
    def run(x):
        raise RuntimeError("model failed")
    batcher = AdaptiveBatcher(run, max_batch_size=8, max_latency_ms=5000)
    with pytest.raises(RuntimeError, match="model failed"):
        run_all(batcher, [np.zeros((1, 1))])


def test_past_the_latency_limit_callers_get_overloaded():
    release = threading.Event()

    def run(x):
        release.wait(5)
        return x

    batcher = AdaptiveBatcher(run, max_batch_size=1, max_latency_ms=50)

    async def main():
        calls = [asyncio.create_task(batcher(np.zeros((1, 1)))) for _ in range(40)]
        await asyncio.sleep(0.5)
        release.set()
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    assert any(isinstance(r, Overloaded) for r in results)
    assert all(isinstance(r, (Overloaded, np.ndarray)) for r in results)


def test_small_calls_are_merged_on_the_event_loop_and_large_ones_run_in_a_thread():
    threads, sizes = [], []

    def run(x):
        threads.append(threading.get_ident())
        return x * 2

    batcher = AdaptiveBatcher(run, max_batch_size=64, max_latency_ms=5000, on_batch=sizes.append,
                              coalesce_max_size=2)
    small = [np.full((1 + i % 2, 3), float(i)) for i in range(40)]

    async def main():
        answers = await asyncio.gather(*(batcher(p) for p in small))
        large = await batcher(np.ones((3, 3)))
        return threading.get_ident(), answers, large

    loop_thread, answers, large = asyncio.run(main())
    for part, answer in zip(small, answers, strict=True):
        np.testing.assert_array_equal(answer, part * 2)
    np.testing.assert_array_equal(large, np.full((3, 3), 2.0))
    assert sum(sizes[:-1]) == sum(len(p) for p in small) and sizes[-1] == 3
    assert len(sizes) == 2, f"40 small calls in one turn were not merged into one run: {sizes}"
    assert threads[0] == loop_thread and threads[-1] != loop_thread


def test_merged_small_calls_keep_to_max_batch_size():
    sizes = []
    batcher = AdaptiveBatcher(lambda x: x + 1, max_batch_size=4, max_latency_ms=5000, on_batch=sizes.append,
                              coalesce_max_size=2)
    parts = [np.full((2, 1), float(i)) for i in range(5)]
    for part, answer in zip(parts, run_all(batcher, parts), strict=True):
        np.testing.assert_array_equal(answer, part + 1)
    assert sizes == [4, 4, 2]


def test_an_error_in_a_merged_small_run_reaches_every_caller():
    def run(x):
        raise RuntimeError("model failed")
    batcher = AdaptiveBatcher(run, max_batch_size=8, max_latency_ms=5000, coalesce_max_size=8)

    async def main():
        return await asyncio.gather(*(batcher(np.zeros((1, 1))) for _ in range(3)), return_exceptions=True)

    results = asyncio.run(main())
    assert [str(r) for r in results] == ["model failed"] * 3


def test_small_calls_wait_behind_a_large_batch_running_in_a_thread():
    """One run at a time: small calls arriving while a large batch runs queue in the dispatcher."""
    running = threading.Lock()
    overlaps = []

    def run(x):
        if not running.acquire(blocking=False):
            overlaps.append(len(x))
            return x
        try:
            time.sleep(0.02 if len(x) > 2 else 0)
            return x
        finally:
            running.release()

    batcher = AdaptiveBatcher(run, max_batch_size=64, max_latency_ms=5000, coalesce_max_size=2)

    async def main():
        large = asyncio.create_task(batcher(np.ones((10, 1))))
        await asyncio.sleep(0.005)  # the large batch is running in its thread
        small = await asyncio.gather(*(batcher(np.full((1, 1), float(i))) for i in range(5)))
        return await large, small

    large, small = asyncio.run(main())
    np.testing.assert_array_equal(large, np.ones((10, 1)))
    assert [float(s[0, 0]) for s in small] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert overlaps == []
