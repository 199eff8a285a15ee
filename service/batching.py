"""Adaptive batching inside a worker: small calls merged on the event loop, large ones by BentoML's dispatcher.

Small calls (at most `coalesce_max_size` images: /predict's one-image calls) are merged with the small
calls that reach the batcher in the same turns of the event loop and run there, on the loop itself:
the first one gives the loop one turn (sleep(0)), every small call that arrives in that turn joins it,
and then it runs them all and answers them (its own answer at once, without a second wake-up). No
timer and no thread: a session run on a few small images costs less than handing it to a thread and
back (two thread wake-ups, slow on a busy machine), and while a run holds the loop the next requests
queue in the sockets, to be read and merged into the next run. At concurrency 1 a call runs alone one
loop turn after it arrives.

Larger calls (many images per call) go through BentoML's adaptive batching: its CorkDispatcher
(bentoml._internal.marshal.dispatcher, the CORK algorithm with its latency optimiser) merges the calls
that arrive while a batch runs into the next one, waiting only as long as the optimiser expects a fuller
batch to pay off, refusing them past `max_latency_ms`, and runs each batch in a thread so the loop keeps
accepting requests meanwhile. A call that finds the worker idle (no batch running, none queued) runs at
once in a thread instead of waiting for the dispatcher's controller, which polls every millisecond.
A batchable BentoML API takes and returns one array, so /predict cannot be one and keep its public
shape; calling one from the wrapper would go through the service's in-process client (a second pass
through the ASGI stack, JSON of every array), so the wrapper drives the dispatcher directly, reached
only through protoserve/bentoml_internals.py, whose test names what changed after a BentoML upgrade;
tests/service/test_batching.py checks the behaviour relied on here.

One run at a time: every run, on the loop or in a thread, holds the dispatcher's one-batch semaphore.
Small calls that find a large batch running go into the dispatcher's queue and run merged after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import anyio
import numpy as np

from protoserve.bentoml_internals import acquire_if_idle, cork_dispatcher, release
from protoserve.errors import ProtoserveError


class Overloaded(ProtoserveError):
    """The batch queue could not answer within max_latency_ms: the service answers 503."""


def _overloaded():
    raise Overloaded("the service is overloaded (batch queue past its latency limit); retry later")


class AdaptiveBatcher:
    """`await batcher(x)` for x [n, ...] -> run([x1; x2; ...])[rows of x]: concurrent calls share one run."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch_size: int, max_latency_ms: int,
                 on_batch: Callable[[int], None] | None = None, coalesce_max_size: int = 0):
        self.run = run
        self.on_batch = on_batch
        self.coalesce_max_size = min(coalesce_max_size, max_batch_size)
        dispatcher = cork_dispatcher(max_latency_ms, max_batch_size, fallback=_overloaded)
        self._dispatcher = dispatcher
        self._call = dispatcher(self._run_merged)
        self._waiting: list[tuple[np.ndarray, asyncio.Future]] = []  # small calls for the next run on the loop
        self._run_due = False

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        if len(x) <= self.coalesce_max_size:
            return await self._coalesced(x)
        d = self._dispatcher
        if len(x) > d.max_batch_size or not acquire_if_idle(d):
            return await self._call(x)
        try:  # idle: run now, holding the semaphore so the dispatcher queues what arrives meanwhile
            self._count(len(x))
            return await anyio.to_thread.run_sync(self.run, x)
        finally:
            release(d)

    async def _run_merged(self, parts: Sequence[np.ndarray]) -> list[np.ndarray]:
        merged = parts[0] if len(parts) == 1 else np.concatenate(parts)
        self._count(len(merged))
        out = await anyio.to_thread.run_sync(self.run, merged)
        return _split(out, parts)

    async def _coalesced(self, x: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((x, future))
        if self._run_due:
            return await future
        # The first small call leads the run: it gives the loop one turn, in which the small calls that
        # arrive join it, then runs them all itself, so its own answer needs no second wake-up (at
        # concurrency 1, every call leads).
        self._run_due = True
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:  # the others still run, one turn later
            future.cancel()
            loop.call_soon(self._run_waiting)
            raise
        self._run_waiting()
        return future.result() if future.done() else await future

    def _run_waiting(self) -> None:
        """The loop's turn for the small calls waiting: up to max_batch_size images in one run, the rest in
        the next turn; behind the dispatcher's queue when a large batch is running."""
        taken = size = 0
        for part, _ in self._waiting:
            if size + len(part) > self._dispatcher.max_batch_size:
                break
            size, taken = size + len(part), taken + 1
        calls, self._waiting = self._waiting[:taken], self._waiting[taken:]
        self._run_due = bool(self._waiting)
        if self._run_due:
            asyncio.get_running_loop().call_soon(self._run_waiting)
        if not acquire_if_idle(self._dispatcher):
            for part, future in calls:
                asyncio.ensure_future(self._through_dispatcher(part, future))
            return
        parts = [part for part, _ in calls]
        try:
            self._count(size)
            answers = _split(self.run(parts[0] if len(parts) == 1 else np.concatenate(parts)), parts)
        except Exception as e:  # every caller of the run gets its error
            answers = [e] * len(calls)
        finally:
            release(self._dispatcher)
        for (_, future), answer in zip(calls, answers, strict=True):
            _settle(future, answer)

    async def _through_dispatcher(self, x: np.ndarray, future: asyncio.Future) -> None:
        try:
            answer = await self._call(x)
        except Exception as e:
            answer = e
        _settle(future, answer)

    def _count(self, size: int) -> None:
        if self.on_batch is not None:
            self.on_batch(size)


def _split(out: np.ndarray, parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The rows of a merged run's output, one array per part, in order (views, as np.split gives, by plain
    slicing: np.split's generality costs more than a one-image run's answer)."""
    rows, start = [], 0
    for part in parts:
        rows.append(out[start:start + len(part)])
        start += len(part)
    return rows


def _settle(future: asyncio.Future, answer: np.ndarray | Exception) -> None:
    if future.done():  # the caller went away (cancelled)
        return
    if isinstance(answer, Exception):
        future.set_exception(answer)
    else:
        future.set_result(answer)
