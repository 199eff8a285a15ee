"""Batch job metrics in the Prometheus conventions for batch jobs: pushed to a Pushgateway at the end
of a run, and/or written for the node exporter's textfile collector (an atomic rename).

    protoserve_batch_images_total{status="scored"|"failed"}   inputs in the job's output, by outcome
    protoserve_batch_duration_seconds                          wall time of the last run
    protoserve_batch_last_success_timestamp_seconds            when a run last finished the job

A failed run (counts None) publishes its duration only and leaves the last success time as it was:
the Pushgateway gets a push-add without it, the textfile keeps the previous value, so an alert on
"time() - last_success > threshold" fires as it should.
"""

from __future__ import annotations

import time
from pathlib import Path

from protoserve.errors import ProtoserveError

JOB_NAME = "protoserve_score"
LAST_SUCCESS = "protoserve_batch_last_success_timestamp_seconds"


class MetricsPushError(ProtoserveError):
    pass


def job_registry(scored: int | None, failed: int | None, duration: float, last_success: float | None):
    """A fresh registry holding the job's figures (never the process-wide default registry); counts are
    left out when unknown (a run that failed)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge

    registry = CollectorRegistry()
    if scored is not None:
        images = Counter("protoserve_batch_images", "Inputs in the batch job's output, by outcome", ["status"],
                         registry=registry)
        images.labels("scored").inc(scored)
        images.labels("failed").inc(failed or 0)
    Gauge("protoserve_batch_duration_seconds", "Wall time of the batch job's last run",
          registry=registry).set(duration)
    if last_success is not None:
        Gauge(LAST_SUCCESS, "Unix time at which a run last completed the batch job",
              registry=registry).set(last_success)
    return registry


def publish(scored: int | None, failed: int | None, duration: float, succeeded: bool, pushgateway: str | None = None,
            metrics_file: str | Path | None = None, grouping_key: dict[str, str] | None = None) -> None:
    """Push and/or write the job's metrics; a failed run keeps the previous last-success time."""
    from prometheus_client import push_to_gateway, pushadd_to_gateway, write_to_textfile

    now = time.time()
    if metrics_file is not None:
        last = now if succeeded else previous_last_success(Path(metrics_file))
        write_to_textfile(str(metrics_file), job_registry(scored, failed, duration, last))
    if pushgateway:
        push = push_to_gateway if succeeded else pushadd_to_gateway
        registry = job_registry(scored, failed, duration, now if succeeded else None)
        try:
            push(pushgateway, job=JOB_NAME, registry=registry, grouping_key=grouping_key or {}, timeout=10)
        except OSError as e:
            raise MetricsPushError(f"pushgateway {pushgateway}: push failed ({e})") from None


def previous_last_success(path: Path) -> float | None:
    """The last-success time in an existing textfile, if there is one."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == LAST_SUCCESS:
                    return sample.value
    except ValueError:
        return None
    return None
