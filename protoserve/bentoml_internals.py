"""The BentoML internals protoserve relies on, behind one small adapter.

BentoML's public API has no way to batch calls inside a worker without an HTTP hop, nor to point
the model store at a directory other than the first $BENTOML_HOME the process saw. So
service/batching.py drives BentoML's CorkDispatcher (its adaptive batching) directly, and
bundle/store.py opens a ModelStore on a path of its choice. Both reach BentoML only through this
module; `check_internals()` lists what no longer matches, and tests/protoserve/
test_bentoml_internals.py fails with that list when a BentoML upgrade changes any of it
(pyproject.toml pins bentoml).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

PINNED = "1.4.39"  # the BentoML version these internals were read from
DISPATCHER_PARAMETERS = ("max_latency_in_ms", "max_batch_size", "fallback", "get_batch_size", "batch_dim")


def cork_dispatcher(max_latency_ms: int, max_batch_size: int, fallback: Callable[[], object]):
    """BentoML's adaptive batching dispatcher over arrays batched on axis 0 (in and out)."""
    from bentoml._internal.marshal.dispatcher import CorkDispatcher

    return CorkDispatcher(max_latency_in_ms=max_latency_ms, max_batch_size=max_batch_size, fallback=fallback,
                          get_batch_size=len, batch_dim=(0, 0))


def acquire_if_idle(dispatcher) -> bool:
    """True, holding the dispatcher's one-batch semaphore, when no batch is running or queued: the
    caller may run its call at once (and must call release); False otherwise, nothing held."""
    return not dispatcher._queue and dispatcher._sema.acquire()


def release(dispatcher) -> None:
    """Give back the semaphore acquire_if_idle took, so the dispatcher runs what queued meanwhile."""
    dispatcher._sema.release()


def model_store(directory: Path):
    """A BentoML ModelStore on `directory`, whatever $BENTOML_HOME the process started with."""
    from bentoml._internal.models import ModelStore

    return ModelStore(str(directory))


def check_internals() -> list[str]:
    """One sentence per internal that no longer behaves as this module assumes; empty when all match."""
    import bentoml

    problems = []
    try:
        from bentoml._internal.marshal.dispatcher import CorkDispatcher
    except ImportError as e:
        return [f"bentoml {bentoml.__version__}: bentoml._internal.marshal.dispatcher.CorkDispatcher is gone ({e})"]
    missing = [p for p in DISPATCHER_PARAMETERS if p not in inspect.signature(CorkDispatcher).parameters]
    if missing:
        problems.append(f"CorkDispatcher() no longer takes {missing}")
    else:
        problems += _check_dispatcher(cork_dispatcher(10, 4, fallback=lambda: None))
    try:
        from bentoml._internal.models import ModelStore
    except ImportError as e:
        problems.append(f"bentoml._internal.models.ModelStore is gone ({e})")
    else:
        if list(inspect.signature(ModelStore).parameters)[:1] != ["base_path"]:
            problems.append(f"ModelStore{inspect.signature(ModelStore)} no longer takes base_path first")
    return [f"bentoml {bentoml.__version__} (read from {PINNED}): {p}" for p in problems]


def _check_dispatcher(dispatcher) -> list[str]:
    problems = []
    if not isinstance(getattr(dispatcher, "max_batch_size", None), int):
        problems.append("CorkDispatcher.max_batch_size is no longer an int attribute")
    queue = getattr(dispatcher, "_queue", None)
    if queue is None or not hasattr(queue, "__len__"):
        problems.append("CorkDispatcher._queue (the waiting calls, a sized deque) is gone")
    sema = getattr(dispatcher, "_sema", None)
    if sema is None or not all(callable(getattr(sema, m, None)) for m in ("acquire", "release")):
        problems.append("CorkDispatcher._sema (the one-batch semaphore with acquire/release) is gone")
    if not problems and (acquire_if_idle(dispatcher), acquire_if_idle(dispatcher)) != (True, False):
        problems.append("CorkDispatcher._sema.acquire() no longer answers True once, then False (non-blocking)")
    return problems
