"""`protoserve worker`: the process that runs the registry's revision jobs (the training install; the
service never does).

A worker claims the oldest queued job (registry/store.py claim_job) under a lease it renews every
few seconds from a heartbeat thread, together with the job's progress (round, epoch, ETA: the
revision's ProgressEvent values) and the tail of its log. The job itself (revise the parent,
register the candidate, promote if asked and the gates pass) is revision/revise.py `revise_version`.

A worker that dies stops renewing its lease: the next claim after the lease ran out resumes the job
from the revision's last finished round (`revision_last.pt` in the job's folder); a job that has
outlived MAX_ATTEMPTS workers is marked failed with the reason. A job whose code raises is marked
failed with the error, and with the one sentence a reviewer reads (registry/job_failures.py).
Nothing is ever left "running" without a live lease.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import traceback
from dataclasses import asdict

from protoserve.errors import ProtoserveError
from protoserve.settings import settings as protoserve_settings
from registry.job_failures import failure_reason
from registry.revision_settings import QueuedRevision
from registry.versions import Registry
from revision.revise import failure_details, failure_kind, revise_version
from revision.rounds import ProgressEvent


class JobLost(ProtoserveError):
    """The job's lease was taken over (this worker was presumed dead): stop working on it."""


class Heartbeat:
    """Renews a job's lease from a thread, with the progress and the log lines the job reported."""

    def __init__(self, registry: Registry, job: dict, settings: QueuedRevision, worker: str, lease: float):
        self.store, self.job_id, self.worker, self.lease = registry.store, job["id"], worker, lease
        epochs = max(1, settings.epochs_per_round) if settings.mode == "revise" else 1
        self.progress = {"stage": "starting", "round": 0, "rounds": settings.rounds_run, "epoch": 0,
                         "epochs": epochs, "eta_seconds": None, "elapsed_seconds": 0.0}
        self.started, self.pending, self.lost = time.monotonic(), [], False
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-job-{self.job_id}")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.beat()

    def log(self, line: str) -> None:
        """The revision's log function: keep the line for the log tail; raise when the job was taken over."""
        self._check_lease()
        with self.lock:
            self.pending.append(str(line).rstrip() + "\n")

    def record(self, event: ProgressEvent) -> None:
        """The revision's progress callback: where the rounds are, for the job's progress fields."""
        self._check_lease()
        with self.lock:
            self.progress.update(asdict(event))

    def stage(self, name: str) -> None:
        with self.lock:
            self.progress["stage"] = name
        self.beat()

    def _check_lease(self) -> None:
        if self.lost:
            raise JobLost(f"job {self.job_id}: its lease was taken over; this worker stops")

    def _beat(self) -> None:
        while not self.stop.wait(max(0.2, self.lease / 4)):
            self.beat()

    def beat(self) -> None:
        with self.lock:
            lines, self.pending = "".join(self.pending), []
            self.progress["elapsed_seconds"] = round(time.monotonic() - self.started, 1)
            progress = dict(self.progress)
        if not self.store.heartbeat(self.job_id, self.worker, self.lease, progress, lines):
            self.lost = True


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_worker(registry: Registry, data_root: str | None = None, once: bool = False, poll_seconds: float = 2.0,
               lease: float | None = None, log=print) -> int:
    """Claim and run jobs until interrupted (or, with `once`, until no job is queued). Returns jobs run.
    lease: seconds (default: the settings' job_lease_seconds)."""
    name, done = worker_name(), 0
    lease = lease if lease is not None else protoserve_settings().job_lease_seconds
    log(f"protoserve worker {name}: watching {registry.root} for revision jobs")
    while True:
        job = registry.store.claim_job(name, lease)
        if job is None:
            if once:
                return done
            time.sleep(poll_seconds)
            continue
        run_revision_job(registry, job, name, data_root, lease, log)
        done += 1


def run_revision_job(registry: Registry, job: dict, worker: str, data_root: str | None, lease: float,
                     log=print) -> None:
    """Run one claimed revision job to done or failed under its lease (see the module docstring)."""
    settings = registry.store.job_settings(job["id"])
    log(f"job {job['id']}: revising {job['parent']} ({settings.mode}), attempt {job['attempts']}")
    with Heartbeat(registry, job, settings, worker, lease) as beat:
        try:
            result = revise_version(registry, job["id"], job["parent"], settings, data_root, beat)
        except JobLost as e:
            log(str(e))
            return
        except Exception as e:  # any failure of the revision is the job's outcome, reported through the API
            fail(registry, job["id"], worker, e, beat)
            log(f"job {job['id']}: failed: {e}")
            return
    registry.store.finish_job(job["id"], worker, result=result)
    log(f"job {job['id']}: candidate {result['candidate']}" + (" promoted" if result.get("promoted") else ""))


def fail(registry: Registry, job_id: int, worker: str, error: Exception, beat: Heartbeat) -> None:
    """Mark the job failed: the technical detail in its log and `error`, the reviewer's sentence in `reason`."""
    kind = failure_kind(error)
    if kind == "other":  # not a failure the project knows: the traceback is what a report of it needs
        beat.log("".join(traceback.format_exception(error)).rstrip())
    beat.log(f"failed ({kind}): {type(error).__name__}: {error}")
    beat.beat()
    registry.store.finish_job(job_id, worker, error=f"{type(error).__name__}: {error}"[:2000],
                              reason=failure_reason(kind, **failure_details(error)))
