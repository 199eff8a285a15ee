"""Shadow evaluation: a candidate version run beside the served one on a sample of live /predict traffic.

In registry mode the registry holds at most one shadow (`POST /review/api/shadow {"version", "sample"}`,
registry/store.py). Every worker polls it beside the active version, loads that version in a thread
(checksums, golden probe, warm-up, as for a switch) and, after /predict has answered, runs a `sample`
share of the requests through it off the response path: the sampled requests of the last DRAIN_SECONDS
are merged into one session run, in a thread, by a task on the worker's loop (one run, one comparison
and one set of metric updates for many requests, so the shadow's cost per request stays small). What
it compares per image, against the served answer: the label, the top-1 prototype (by stable id), the
in-domain judgement; and how long its run took. The figures are Prometheus metrics
(`protoserve_shadow_*{version}`, service/metrics.py) summed over the workers at scrape time, which the
review page reads back (`GET /review/api/shadow`). A shadow that fails to load, or fails on a request,
is counted and logged; the answer has already gone.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import numpy as np

from inference.domain import domain_rule
from inference.model import LoadedModel, load_model
from protoserve.settings import settings
from service.metrics import labelled, metrics

log = logging.getLogger("protoserve.service")
DRAIN_SECONDS = 0.05  # how long sampled requests wait to be merged into one shadow run
MAX_PENDING_IMAGES = 4096  # past this, sampled requests are skipped until the shadow catches up (counted)


@dataclass
class ShadowVersion:
    model: LoadedModel
    domain: object | None  # its out-of-domain rule (None: no calibration)
    sample: float

    @property
    def version(self) -> str:
        return self.model.version

    @property
    def features(self) -> str | None:
        return self.domain.features if self.domain is not None else None


@dataclass(frozen=True)
class Comparison:
    """How a shadow's answers for N images compare with the served ones."""
    images: int
    same_label: int
    same_prototype: int
    same_in_domain: int | None  # None: a side without an out-of-domain calibration
    changed: list[tuple[int, int]]  # (served label, shadow label) of each changed answer
    out_of_domain: tuple[int, int] | None  # (served, shadow) out-of-domain images


def top_prototype(distances: np.ndarray, active: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """[N, M] -> [N] stable id of each image's nearest active prototype (first of equals: table order)."""
    return ids[np.where(active[None, :], distances, np.inf).argmin(axis=1)]


def compare(served: tuple[np.ndarray, np.ndarray, np.ndarray | None],
            shadow: tuple[np.ndarray, np.ndarray, np.ndarray | None]) -> Comparison:
    """Each side's (labels [N], top-1 prototype ids [N], in_domain [N] bool or None) -> the comparison."""
    (labels, tops, in_domain), (s_labels, s_tops, s_in_domain) = served, shadow
    differ = np.flatnonzero(labels != s_labels)
    both = in_domain is not None and s_in_domain is not None
    return Comparison(len(labels), int((labels == s_labels).sum()), int((tops == s_tops).sum()),
                      int((in_domain == s_in_domain).sum()) if both else None,
                      [(int(labels[i]), int(s_labels[i])) for i in differ],
                      (int((~in_domain).sum()), int((~s_in_domain).sum())) if both else None)


def record(version: str, c: Comparison, seconds: float) -> None:
    m = metrics()
    labelled(m.shadow_images, version).inc(c.images)
    labelled(m.shadow_agreed, version, "label").inc(c.same_label)
    labelled(m.shadow_agreed, version, "prototype").inc(c.same_prototype)
    if c.same_in_domain is not None:
        labelled(m.shadow_agreed, version, "in_domain").inc(c.same_in_domain)
    for served, shadow in c.changed:
        labelled(m.shadow_changed, version, str(served), str(shadow)).inc()
    if c.out_of_domain is not None:
        labelled(m.shadow_out_of_domain, version, "served").inc(c.out_of_domain[0])
        labelled(m.shadow_out_of_domain, version, "shadow").inc(c.out_of_domain[1])
    labelled(m.shadow_seconds, version).observe(seconds)


class Shadow:
    """This worker's shadow: follows the registry's shadow row and compares the sampled requests."""

    def __init__(self, registry, poll_seconds: float | None = None):
        self.registry = registry
        self.poll_seconds = settings().poll_seconds if poll_seconds is None else poll_seconds
        self.current: ShadowVersion | None = None
        self.failed: dict[str, str] = {}  # version -> why it was not loaded
        self.pending: list[tuple[object, np.ndarray, np.ndarray]] = []  # (served version, batch, output)
        self.pending_images = 0
        self.drain_task: asyncio.Task | None = None  # held, so it is not collected midway
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run(), name="protoserve-follow-shadow")

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception as e:  # the poller must outlive a locked or briefly missing database
                log.warning("protoserve: shadow poll failed: %s", e)
            await asyncio.sleep(self.poll_seconds)

    async def check(self) -> None:
        version, sample, _ = await asyncio.to_thread(self.registry.store.shadow)
        if version is None:
            self.current = None
            return
        if self.current is not None and self.current.version == version:
            self.current.sample = sample
            return
        if version in self.failed:
            return
        try:
            path = await asyncio.to_thread(self.registry.bundle_path, version)  # with s3:// versions, a download
            model = await asyncio.to_thread(load_model, path)
        except Exception as e:  # BundleError, RegistryError, ORT errors: no shadow, the answers unchanged
            self.failed[version] = str(e)
            labelled(metrics().shadow_failures, version).inc()
            log.error("protoserve: shadow version %s not loaded: %s", version, e)
            return
        self.current = ShadowVersion(model, domain_rule(model.bundle.manifest, model.active), sample)
        log.info("protoserve: shadowing %s on %.0f%% of /predict requests", version, 100 * sample)

    def offer(self, served, batch: np.ndarray, output: np.ndarray) -> None:
        """After /predict answered `batch` with `output` (its batcher's [N, K + M + 2]): compare a sampled
        share off the response path."""
        shadow = self.current
        if shadow is None or random.random() >= shadow.sample:
            return
        if self.pending_images + len(batch) > MAX_PENDING_IMAGES:
            labelled(metrics().shadow_failures, shadow.version).inc()  # skipped: the shadow is behind
            return
        self.pending.append((served, batch, output))
        self.pending_images += len(batch)
        if self.drain_task is None:
            self.drain_task = asyncio.get_running_loop().create_task(self.drain())

    async def drain(self) -> None:
        """After DRAIN_SECONDS, compare everything sampled meanwhile: one run per served version."""
        await asyncio.sleep(DRAIN_SECONDS)
        pending, self.pending, self.pending_images = self.pending, [], 0
        shadow = self.current
        try:
            if shadow is None:  # ended meanwhile
                return
            by_version: dict[int, list] = {}
            for served, batch, output in pending:
                by_version.setdefault(id(served), []).append((served, batch, output))
            for group in by_version.values():
                await self.compare(shadow, group[0][0], np.concatenate([b for _, b, _ in group]),
                                   np.concatenate([o for _, _, o in group]))
        finally:
            self.drain_task = None
            if self.pending:  # sampled while this run was in its thread
                self.drain_task = asyncio.get_running_loop().create_task(self.drain())

    async def compare(self, shadow: ShadowVersion, served, batch: np.ndarray, output: np.ndarray) -> None:
        try:
            if shadow.model.bundle.manifest.input != served.manifest.input:
                raise ValueError("the shadow takes other inputs than the served version (manifest input spec)")
            started = time.perf_counter()
            probabilities, distances, *features = await asyncio.to_thread(shadow.model.classify, batch,
                                                                          shadow.features)
            seconds = time.perf_counter() - started
            K = len(served.manifest.class_names)
            served_side = side(output[:, :K], output[:, K:-2], served.active, served.prototype_ids,
                               None if served.domain is None else output[:, -2] == 1.0)
            labels = probabilities.argmax(axis=1)
            in_domain = None
            if shadow.domain is not None:
                in_domain = shadow.domain.judge(distances, labels, features[0] if features else None,
                                                flat=shadow.domain.flat(batch))[0]
            shadow_side = side(probabilities, distances, shadow.model.active,
                               [row.id for row in shadow.model.bundle.manifest.prototypes], in_domain)
            record(shadow.version, compare(served_side, shadow_side), seconds)
        except Exception as e:
            labelled(metrics().shadow_failures, shadow.version).inc()
            log.warning("protoserve: shadow %s failed on a request: %s", shadow.version, e)


def side(probabilities: np.ndarray, distances: np.ndarray, active: np.ndarray, ids,
         in_domain: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One version's (labels, top-1 prototype ids, in_domain) for the comparison."""
    return (probabilities.argmax(axis=1), top_prototype(distances, active, np.asarray(ids, dtype=np.int64)),
            in_domain)
