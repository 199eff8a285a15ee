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


def test_an_inline_call_on_an_idle_batcher_runs_on_the_event_loop_and_others_in_a_thread():
    threads = []

    def run(x):
        threads.append(threading.get_ident())
        return x

    batcher = AdaptiveBatcher(run, max_batch_size=64, max_latency_ms=5000)

    async def main():
        loop_thread = threading.get_ident()
        for size, inline in ((1, True), (2, True), (3, False)):
            np.testing.assert_array_equal(await batcher(np.arange(size), inline=inline), np.arange(size))
        return loop_thread

    loop_thread = asyncio.run(main())
    assert threads[:2] == [loop_thread, loop_thread]
    assert threads[2] != loop_thread
