"""What one worker serves: a loaded bundle version, and (in registry mode) following the active one.

A worker holds one `ServedVersion` at a time: the loaded model with everything an answer needs
(manifest, pictures, its own adaptive batcher). A request takes the current one once, at its
start, and uses only it, so an answer is computed and labelled by the same version even when the
worker switches while the request is in flight; the old version is dropped when its last request
has answered.

In registry mode (PROTOSERVE_REGISTRY) a background task polls the registry's generation counter
every PROTOSERVE_POLL_SECONDS (protoserve/settings.py): one indexed single-row read, off the request path, so
/predict pays nothing for it. On PostgreSQL a thread also LISTENs for the NOTIFY a promote or rollback
sends when it commits and wakes the task at once; the poll stays, for a notification lost with its
connection. With s3:// versions the follower also downloads, in the background, the versions a promote
may pick next (the rollback target and the newest never-active ones, PROTOSERVE_PREFETCH_VERSIONS):
once at start and, on PostgreSQL, whenever a version is registered; so a switch waits on no download.
A new generation loads the active version in a thread (checksums,
golden probe, warm-up) while the old one keeps answering, then swaps. A version that fails to load
(with s3:// versions: one whose download fails or does not match its checksums, registry/objects.py)
is logged, counted in protoserve_version_refusals_total, shown in /metadata, and skipped until the
generation moves again (an object store that could not be read: tried again every 10 s); the old
one keeps serving.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bundle.manifest import BundleError
from inference.explanation import prototype_pictures
from inference.model import LoadedModel, bundle_location, load_model
from protoserve.settings import settings
from registry.objects import ChecksumError, ObjectStoreError
from registry.store import RegistryError
from registry.versions import Registry, registry_location
from service.metrics import count_refusal

log = logging.getLogger("protoserve.service")
OBJECT_STORE_RETRY_SECONDS = 10.0


@dataclass
class ServedVersion:
    model: LoadedModel
    generation: int | None  # the registry generation it was loaded for (None: a fixed bundle)
    classify: Callable | None = None  # the version's adaptive batcher for /predict, set by the service
    score: Callable | None = None  # and for score_batch
    pictures: dict[int, str | None] = field(default_factory=dict)
    source_pictures: dict[int, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # on every answer: worker and version
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # the same, encoded (service/responses.py)
    domain: object | None = None  # its out-of-domain rule (inference/domain.py), None without calibration
    prototype_quality: dict[int, dict | None] = field(default_factory=dict)  # id -> quality figures

    # Read on every request: worked out once (a loaded version never changes).
    @functools.cached_property
    def manifest(self):
        return self.model.bundle.manifest

    @property
    def active(self) -> np.ndarray:
        return self.model.active

    @property
    def features(self) -> str | None:
        """The model.onnx output its out-of-domain rule reads besides the distances (None: none)."""
        return self.domain.features if self.domain is not None else None

    @functools.cached_property
    def model_id(self) -> tuple[str, str]:
        return self.manifest.name, self.manifest.version

    @functools.cached_property
    def version(self) -> str:
        return self.manifest.version

    @functools.cached_property
    def prototype_ids(self) -> list[int]:
        return [row.id for row in self.manifest.prototypes]

    def ref(self) -> dict:
        return {"name": self.manifest.name, "version": self.manifest.version}


def served_version(model: LoadedModel, generation: int | None) -> ServedVersion:
    """A loaded model with its prototype pictures read once (base64 PNG)."""
    pictures = prototype_pictures(model.bundle)  # ProtoPNet's sources: each prototype's training image, boxed
    return ServedVersion(model, generation, pictures=pictures.images, source_pictures=pictures.sources)


def initial_location() -> tuple[Path, int | None, Registry | None]:
    """(bundle directory, generation, registry): the registry's active version, else the fixed bundle."""
    root = registry_location()
    if root is None:
        return bundle_location(), None, None
    registry = Registry(root)
    generation, version = registry.store.generation()
    if version is None:
        raise RegistryError(f"{root}: no active version yet (protoserve registry promote VERSION)")
    return registry.bundle_path(version), generation, registry


class ActiveVersionFollower:
    """Polls the registry; on a new generation loads the active version and hands it to `switch`."""

    def __init__(self, registry: Registry, generation: int, version: str,
                 switch: Callable[[ServedVersion], None], poll_seconds: float | None = None):
        self.registry, self.generation, self.version = registry, generation, version
        self.switch = switch
        self.poll_seconds = settings().poll_seconds if poll_seconds is None else poll_seconds
        self.failed: dict[int, str] = {}  # generation -> why its version was not loaded
        self.retry_at: dict[int, float] = {}  # generation -> when to try again (an object store may come back)
        self.task: asyncio.Task | None = None
        self.wake = asyncio.Event()  # set when the database says the active version changed
        self.stop = threading.Event()  # ends the listening thread

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = self.loop.create_task(self.run(), name="protoserve-follow-registry")
        if self.registry.store.pushes_switches:
            threading.Thread(target=self.registry.store.listen_for_switches,
                             args=(self.heard, self.stop, self.registered),
                             daemon=True, name="protoserve-listen-registry").start()
        else:
            self.registered("")

    def registered(self, version: str) -> None:
        """From the listening thread (and once at start): a version was registered ("": maybe some were).
        Downloads the versions likely to be activated next, in a thread of its own, so a promote finds
        them in the cache (s3:// versions; folder versions are local already)."""
        threading.Thread(target=self.prefetch, daemon=True, name="protoserve-prefetch").start()

    def prefetch(self) -> None:
        try:
            versions = self.registry.likely_next(settings().prefetch_versions)
            for version, why in self.registry.prefetch(versions).items():
                log.warning("protoserve: version %s not fetched ahead of a promote: %s", version, why)
        except Exception as e:  # a registry that cannot be read now: the promote downloads what it needs
            log.warning("protoserve: fetching versions ahead of a promote failed: %s", e)

    def heard(self, generation: str) -> None:
        """From the listening thread: the database says the active version changed (or it reconnected)."""
        try:
            self.loop.call_soon_threadsafe(self.wake.set)
        except RuntimeError:  # the event loop is closed: the service is stopping
            self.stop.set()

    def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            self.task.cancel()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), self.poll_seconds)
            except TimeoutError:
                pass
            self.wake.clear()  # a notification during the check below sets it again: one more check
            try:
                await self.check()
            except Exception as e:  # the poller must outlive a locked or briefly missing database
                log.warning("protoserve: registry poll failed: %s", e)

    async def check(self) -> None:
        generation, version = await asyncio.to_thread(self.registry.store.generation)
        if generation == self.generation or version is None:
            return
        if generation in self.failed and time.monotonic() < self.retry_at.get(generation, math.inf):
            return
        if version == self.version:  # e.g. promote then rollback between two polls
            self.generation = generation
            return
        try:
            path = await asyncio.to_thread(self.registry.bundle_path, version)  # with s3:// versions, a download
            model = await asyncio.to_thread(load_model, path)
            served = await asyncio.to_thread(served_version, model, generation)
        except Exception as e:  # BundleError, RegistryError, ORT errors: the old version keeps serving
            self.failed[generation], reason = f"{version}: {e}", refusal_reason(e)
            count_refusal(version, reason)
            if reason == "object_store":  # unreachable or refused: may pass later, unlike a bad checksum
                self.retry_at[generation] = time.monotonic() + OBJECT_STORE_RETRY_SECONDS
            log.error("protoserve: version %s (generation %d) not loaded, still serving %s: %s", version,
                      generation, self.version, e)
            return
        self.switch(served)
        self.generation, self.version = generation, version
        self.failed.pop(generation, None)  # loaded on a retry: no longer a refusal to show
        log.info("protoserve: now serving %s (generation %d)", version, generation)


def refusal_reason(error: BaseException) -> str:
    """The `reason` label of a version not loaded: checksum (a download that does not match its manifest),
    object_store (unreachable, missing object, no access), bundle (any other bundle check), other."""
    for kind, reason in ((ChecksumError, "checksum"), (ObjectStoreError, "object_store"), (BundleError, "bundle")):
        if isinstance(error, kind):
            return reason
    return "other"
