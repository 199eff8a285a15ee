"""Counting answers a batch at a time (service/metrics.py) gives the figures of counting them one by one."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from service.metrics import CONFIDENCE_BUCKETS, DISTANCE_BUCKETS, metrics, observe_many, observer, record_answers


def samples(registry: CollectorRegistry) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in registry.collect() for s in m.samples
            if not s.name.endswith("_created")}


def test_observe_many_is_observe_for_each_value():
    values = [0.0, 0.0005, 0.0007, 1.0, 1.0000001, -3.0, 99.0, 1e9, 7.5, 0.3, 0.3, 20.0]  # bounds, between, past
    values += np.array(values, dtype=np.float32).tolist()  # the model's float32 numbers, as the service has them
    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("d", "distance", ["model"], buckets=DISTANCE_BUCKETS, registry=one).labels("m")
    h2 = Histogram("d", "distance", ["model"], buckets=DISTANCE_BUCKETS, registry=many).labels("m")
    for value in values:
        h1.observe(value)
    observe_many(h2, np.array(values))
    observe_many(h2, np.array([]))
    a, b = samples(one), samples(many)
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert b[key] == pytest.approx(value, rel=1e-12), key
    h1.observe(math.nan)  # no bucket, a NaN sum: the same either way
    observe_many(h2, np.array([math.nan]))
    assert samples(one) == pytest.approx(samples(many), nan_ok=True)


def test_an_observer_is_observe():
    """observer(histogram, *labels) writes what the child's observe writes: bounds, between and past them, inf, NaN."""
    values = [0.0, 0.0005, 0.0007, 1.0, 1.0000001, -3.0, 99.0, 1e9, 7.5, 0.3, 0.3, 20.0, math.inf]
    values += np.array(values, dtype=np.float32).tolist()
    for buckets in (DISTANCE_BUCKETS, CONFIDENCE_BUCKETS):
        one, fast = CollectorRegistry(), CollectorRegistry()
        h1 = Histogram("d", "distance", ["model"], buckets=buckets, registry=one).labels("m")
        observe = observer(Histogram("d", "distance", ["model"], buckets=buckets, registry=fast), "m")
        for value in values:
            h1.observe(value)
            observe(value)
        assert samples(one) == samples(fast)
        h1.observe(math.nan)
        observe(math.nan)
        assert samples(one) == pytest.approx(samples(fast), nan_ok=True)


def test_a_batch_is_counted_as_its_images_one_by_one():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(4), size=50).astype(np.float32)
    nearest = rng.integers(0, 6, 50)
    distances = rng.uniform(0, 3, 50)
    names, ids = ["a", "b", "c", "d"], [10, 11, 12, 13, 14, 15]
    record_answers(("m", "together"), names, ids, probabilities, nearest, distances)
    for i in range(50):
        record_answers(("m", "alone"), names, ids, probabilities[i:i + 1], nearest[i:i + 1], distances[i:i + 1])
    m = metrics()
    for metric in (m.predictions, m.nearest_prototype, m.confidence, m.nearest_distance):
        rows = {}
        for family in metric.collect():
            for s in family.samples:
                if s.labels.get("model") == "m" and not s.name.endswith("_created"):
                    key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "version")))
                    rows.setdefault(key, {})[s.labels["version"]] = s.value
        assert rows and all(v["together"] == pytest.approx(v["alone"], rel=1e-9) for v in rows.values()), rows
