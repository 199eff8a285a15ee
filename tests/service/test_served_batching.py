"""Adaptive batching in the served workers: one-image /predict calls that arrive together share runs."""

from __future__ import annotations

import asyncio

import httpx

SERIES = "protoserve_adaptive_batch_size"


def batch_series(url: str) -> tuple[float, float]:
    """(images, session runs) so far in the adaptive batch-size histogram, both workers summed."""
    values = {"sum": 0.0, "count": 0.0}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        for part in values:
            if line.startswith(f"{SERIES}_{part}"):
                values[part] += float(line.rpartition(" ")[2])
    return values["sum"], values["count"]


async def burst(url: str, body: dict, calls: int) -> list[int]:
    limits = httpx.Limits(max_connections=calls)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        answers = await asyncio.gather(*(client.post(f"{url}/predict", json=body) for _ in range(calls)))
    return [r.status_code for r in answers]


def test_concurrent_one_image_calls_are_merged_into_shared_session_runs(server):
    """Calls in flight together go through the batcher (not one inline run each), so some session run
    holds more than one image: the histogram's image sum grows faster than its count of runs."""
    body = {"images": [[[0.5] * 28] * 28]}
    for _ in range(3):  # a burst on a busy machine may still arrive one call at a time; three chances
        images_before, runs_before = batch_series(server)
        assert set(asyncio.run(burst(server, body, 64))) == {200}
        images_after, runs_after = batch_series(server)
        images, runs = images_after - images_before, runs_after - runs_before
        assert images == 64 and 1 <= runs <= 64
        if runs < images:
            return
    raise AssertionError(f"three bursts of 64 concurrent calls, every session run held one image ({runs} runs)")
