"""Adaptive batching inside a worker: BentoML's own dispatcher, without an HTTP hop.

BentoML batches an API declared `batchable=True` by routing each call through a CorkDispatcher
(bentoml._internal.marshal.dispatcher, the CORK algorithm with its latency optimiser): calls that
arrive while a batch runs are merged into the next one, waiting only as long as the optimiser
expects a fuller batch to pay off, and refused past `max_latency_ms`. A batchable API takes and
returns one array, so /predict cannot be one and keep its public shape; calling a batchable API
from the wrapper goes through the service's in-process client: a second pass through the ASGI
stack and JSON of every array, far slower than the model run. So the
wrapper calls the same dispatcher directly. The dispatcher is BentoML-internal: it is reached only
through protoserve/bentoml_internals.py, whose test names what changed after a BentoML upgrade;
tests/service/test_batching.py checks the behaviour relied on here.

Fast path: a call that finds the worker idle (no batch running, none queued) runs at once instead
of entering the dispatcher, whose controller polls every millisecond and may wait for a batch to
fill: at concurrency 1 that added milliseconds to every answer. The fast run holds the dispatcher's
one-batch semaphore, so calls arriving meanwhile queue in the dispatcher and run merged after it.
A fast call the caller marks `inline` (the service does so for a request of at most a few images
when it is the only one in flight) runs on the event loop itself: handing a 0.1 ms model run to a
worker thread and back costs two thread wake-ups, which on a busy machine take milliseconds
(README "Serving speed"). Other calls, and every merged batch, go to a thread so the loop keeps
accepting requests while the model runs, and those requests can be merged into the next batch.
"""

from __future__ import annotations

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
                 on_batch: Callable[[int], None] | None = None):
        self.run = run
        self.on_batch = on_batch
        dispatcher = cork_dispatcher(max_latency_ms, max_batch_size, fallback=_overloaded)
        self._dispatcher = dispatcher
        self._call = dispatcher(self._run_merged)

    async def __call__(self, x: np.ndarray, inline: bool = False) -> np.ndarray:
        d = self._dispatcher
        if len(x) > d.max_batch_size or not acquire_if_idle(d):
            return await self._call(x)
        try:  # idle: run now, holding the semaphore so the dispatcher queues what arrives meanwhile
            if self.on_batch is not None:
                self.on_batch(len(x))
            if inline:
                return self.run(x)
            return await anyio.to_thread.run_sync(self.run, x)
        finally:
            release(d)

    async def _run_merged(self, parts: Sequence[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(p) for p in parts]
        merged = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if self.on_batch is not None:
            self.on_batch(len(merged))
        out = await anyio.to_thread.run_sync(self.run, merged)
        return np.split(out, np.cumsum(sizes)[:-1])
