"""A worker freezes its startup objects out of the garbage collector's reach, and a version switch
unfreezes them so the version it replaces can be collected."""

from __future__ import annotations

import asyncio
import gc

from inference.model import DEFAULT_BUNDLE, load_model
from service.served_version import served_version


def test_startup_freezes_and_a_switch_unfreezes(monkeypatch):
    monkeypatch.delenv("PROTOSERVE_REGISTRY", raising=False)
    from service.api import Protoserve

    worker = Protoserve.inner()
    try:
        asyncio.run(worker.follow_registry())
        assert gc.get_freeze_count() > 0
        worker._switch(served_version(load_model(DEFAULT_BUNDLE), worker.current.generation))
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
