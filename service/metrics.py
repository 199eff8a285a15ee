"""protoserve's Prometheus metrics (ARCHITECTURE.md "Metrics"), correct with several workers.

BentoML starts every worker with PROMETHEUS_MULTIPROC_DIR set and serves /metrics through a
MultiProcessCollector over that directory, so each worker's counters are summed at scrape time.
prometheus_client picks its storage when a metric is first built, so the metrics are built on
first use inside the worker (never at import time, which may run before the variable is set).
"""

from __future__ import annotations

import bisect
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# Nearest-prototype distances span both families: PrototypeDL's test images sit at ~0.3 (median) from
# their nearest prototype, ProtoPNet's nearest patch at ~0.005. The drift alert compares the live
# median with the test set's 95th percentile, so the buckets must resolve both scales
# (tests/export/test_shipped_models.py checks it on the shipped bundles).
DISTANCE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0,
                    10.0, 20.0, 50.0, 100.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SECONDS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class Metrics:
    predictions: object
    nearest_prototype: object
    nearest_distance: object
    confidence: object
    inference_seconds: object
    rejected_inputs: object
    model_info: object
    reference_nearest_distance: object
    batch_images: object
    batch_size: object
    out_of_domain: object
    out_of_domain_expected: object
    shadow_images: object
    shadow_agreed: object
    shadow_changed: object
    shadow_out_of_domain: object
    shadow_seconds: object
    shadow_failures: object
    version_refusals: object


@functools.cache
def metrics() -> Metrics:
    """The process's metric objects, built on first call (after the worker set up multiprocess mode)."""
    from prometheus_client import Counter, Gauge, Histogram

    model = ["model", "version"]
    return Metrics(
        predictions=Counter("protoserve_predictions", "Images classified, by predicted class",
                            [*model, "class"]),
        nearest_prototype=Counter("protoserve_nearest_prototype", "Images whose nearest active prototype "
                                  "was this one", [*model, "prototype"]),
        nearest_distance=Histogram("protoserve_nearest_distance", "Squared L2 distance from an input to "
                                   "its nearest active prototype", model, buckets=DISTANCE_BUCKETS),
        confidence=Histogram("protoserve_confidence", "Probability of the predicted class", model,
                             buckets=CONFIDENCE_BUCKETS),
        inference_seconds=Histogram("protoserve_inference_seconds", "Time in the model per request "
                                    "(preprocessing to answer)", [*model, "api"], buckets=SECONDS_BUCKETS),
        rejected_inputs=Counter("protoserve_rejected_inputs", "Requests refused with a 4xx, by reason",
                                ["reason"]),
        # livemax: one series per label set (no pid label), gone when the process that set it is.
        model_info=Gauge("protoserve_model_info", "The model being served (always 1)",
                         [*model, "family", "provider"], multiprocess_mode="livemax"),
        # `level` names the quantile: the label `quantile` is reserved for summaries (promtool check metrics).
        reference_nearest_distance=Gauge("protoserve_reference_nearest_distance", "Nearest-prototype "
                                         "distance of the bundle's held-out images at this quantile level",
                                         [*model, "level"], multiprocess_mode="livemax"),
        batch_images=Counter("protoserve_batch_images", "Images scored by batch jobs, by outcome", ["status"]),
        batch_size=Histogram("protoserve_adaptive_batch_size", "Images per session run of /predict's adaptive "
                             "batching", model, buckets=BATCH_BUCKETS),
        out_of_domain=Counter("protoserve_out_of_domain", "Images judged unlike the model's validation images "
                              "(inference/domain.py), by API", [*model, "api"]),
        out_of_domain_expected=Gauge("protoserve_out_of_domain_expected_ratio", "Share of in-domain images the "
                                     "bundle's out-of-domain threshold flags (its calibrated false-alarm rate)",
                                     model, multiprocess_mode="livemax"),
        # Shadow evaluation (service/shadow.py): `version` is the shadow's, compared with the served version.
        shadow_images=Counter("protoserve_shadow_images", "Images answered by the served version and also run "
                              "through the shadow version", ["version"]),
        shadow_agreed=Counter("protoserve_shadow_agreed", "Shadowed images on which the shadow agreed with the "
                              "served answer: label, top-1 prototype id, in_domain", ["version", "what"]),
        shadow_changed=Counter("protoserve_shadow_changed_answers", "Shadowed images whose label the shadow "
                               "changed, by the served and the shadow's class", ["version", "served", "shadow"]),
        shadow_out_of_domain=Counter("protoserve_shadow_out_of_domain", "Shadowed images judged out of domain, by "
                                     "the served version and by the shadow", ["version", "by"]),
        shadow_seconds=Histogram("protoserve_shadow_seconds", "Time of each shadow run (the requests sampled "
                                 "within 50 ms merged into one)",
                                 ["version"], buckets=SECONDS_BUCKETS),
        shadow_failures=Counter("protoserve_shadow_failures", "Sampled requests the shadow failed on, or "
                                "skipped while it was behind (the answers never see it)", ["version"]),
        version_refusals=Counter("protoserve_version_refusals", "Versions a worker was told to serve and did not "
                                 "load (it kept serving the one it had), by reason: checksum, object_store, "
                                 "bundle, other", ["version", "reason"]),
    )


def labelled(metric, *labels: str):
    """metric.labels(*labels), looked up once per label set: the child is the same object every time,
    and prometheus_client's lookup (a lock, label checks) is a measurable part of a small request."""
    return _children(metric, labels)


@functools.cache
def _children(metric, labels: tuple[str, ...]):
    return metric.labels(*labels)


def observer(histogram, *labels: str) -> Callable[[float], None]:
    """labelled(histogram, *labels).observe, looked up once per label set: for the histograms every answer
    updates, `observe_one` on the child."""
    return _observers(histogram, labels)


@functools.cache
def _observers(histogram, labels: tuple[str, ...]) -> Callable[[float], None]:
    child = labelled(histogram, *labels)
    bounds, buckets, total = (getattr(child, name, None) for name in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        return child.observe
    bounds = list(bounds)

    def observe_one(value: float) -> None:
        """child.observe(value), written as observe writes it (the sum, then the bucket of the first bound >= value)
        with the bucket found by bisection instead of a loop over the bounds, and the label check done once."""
        if value != value:  # NaN: in no bucket
            return child.observe(value)
        total.inc(value)
        buckets[bisect.bisect_left(bounds, value)].inc(1)

    return observe_one


def record_answers(model: tuple[str, str], class_names: list[str], prototype_ids: list[int],
                   probabilities, nearest_index, nearest_distance, labels=None) -> None:
    """Count one batch of answers: predicted class, confidence, nearest prototype and its distance. A
    batch of several images is counted at once: one update per class, prototype and histogram bucket it
    holds, not one per image (in multiprocess mode every update writes to the worker's file). `labels`:
    probabilities.argmax(axis=1), when the caller has it."""
    m = metrics()
    labels = probabilities.argmax(axis=1) if labels is None else labels
    if len(labels) == 1:  # one image: the plain updates cost less than the counting below
        label, j = int(labels[0]), int(nearest_index[0])
        labelled(m.predictions, *model, class_names[label]).inc()
        labelled(m.nearest_prototype, *model, str(prototype_ids[j])).inc()
        observer(m.confidence, *model)(float(probabilities[0, label]))
        observer(m.nearest_distance, *model)(float(nearest_distance[0]))
        return
    confidence, distance = labelled(m.confidence, *model), labelled(m.nearest_distance, *model)
    for label, n in nonzero_counts(labels, len(class_names)):
        labelled(m.predictions, *model, class_names[label]).inc(n)
    for j, n in nonzero_counts(nearest_index, len(prototype_ids)):
        labelled(m.nearest_prototype, *model, str(prototype_ids[j])).inc(n)
    observe_many(confidence, probabilities[np.arange(len(labels)), labels])
    observe_many(distance, nearest_distance)


def nonzero_counts(index, size: int) -> list[tuple[int, int]]:
    """(i, how many times i occurs in index) for each i in 0..size-1 that occurs."""
    counts = np.bincount(index, minlength=size)
    present = np.flatnonzero(counts)
    return list(zip(present.tolist(), counts[present].tolist(), strict=True))


def observe_many(histogram, values) -> None:
    """histogram.observe(v) for each of `values`, written as one update per bucket they fall in and one of
    the sum. prometheus_client has no public call for it: this reads the histogram's bounds and bucket
    values (tests/service/test_metrics.py checks it against observe), else observes one at a time."""
    values = np.asarray(values, dtype=np.float64)
    bounds, buckets, total = (getattr(histogram, name, None) for name in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values.tolist():
            histogram.observe(value)
        return
    index = np.searchsorted(np.asarray(bounds), values, side="left")  # observe's bucket: the first bound >= v
    for i, n in nonzero_counts(index, len(bounds) + 1):  # len(bounds): NaN, in no bucket
        if i < len(bounds):
            buckets[i].inc(n)
    total.inc(float(values.sum()))


def count_out_of_domain(model: tuple[str, str], api: str, count: int) -> None:
    """Add `count` out-of-domain images answered by `api` (predict, explain, score_batch)."""
    if count:
        labelled(metrics().out_of_domain, *model, api).inc(count)


def count_refusal(version: str, reason: str) -> None:
    """A version this worker did not load (service/served_version.py says why)."""
    labelled(metrics().version_refusals, version, reason).inc()


def count_rejection(reason: str) -> None:
    labelled(metrics().rejected_inputs, reason).inc()


SHADOW_COMPARED = ("label", "prototype", "in_domain")


def shadow_figures(version: str) -> dict:
    """The shadow's live figures summed over every worker (what /metrics shows): images, agreements and
    their shares, changed answers by class, out-of-domain counts, failures, mean latency."""
    from prometheus_client import REGISTRY, CollectorRegistry, multiprocess

    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    values: dict[str, float] = {}
    changed, out_of_domain = [], {"served": 0, "shadow": 0}
    for family in registry.collect():
        if not family.name.startswith("protoserve_shadow"):
            continue
        for sample in family.samples:
            if sample.labels.get("version") != version:
                continue
            name, labels = sample.name, sample.labels
            if name == "protoserve_shadow_changed_answers_total":
                changed.append({"served": labels["served"], "shadow": labels["shadow"], "images": int(sample.value)})
            elif name == "protoserve_shadow_out_of_domain_total":
                out_of_domain[labels["by"]] += int(sample.value)
            elif name == "protoserve_shadow_agreed_total":
                values[f"agreed_{labels['what']}"] = values.get(f"agreed_{labels['what']}", 0) + sample.value
            elif name in ("protoserve_shadow_images_total", "protoserve_shadow_failures_total",
                          "protoserve_shadow_seconds_sum", "protoserve_shadow_seconds_count"):
                values[name] = values.get(name, 0) + sample.value
    images = int(values.get("protoserve_shadow_images_total", 0))
    runs = values.get("protoserve_shadow_seconds_count", 0)
    agreed = {what: int(values.get(f"agreed_{what}", 0)) for what in SHADOW_COMPARED}
    return {"images": images, "agreed": agreed,
            "agreement": {what: (n / images if images else None) for what, n in agreed.items()},
            "changed_answers": sorted(changed, key=lambda c: -c["images"]), "out_of_domain": out_of_domain,
            "failures": int(values.get("protoserve_shadow_failures_total", 0)),
            "mean_seconds": values.get("protoserve_shadow_seconds_sum", 0) / runs if runs else None}
