"""`protoserve worker`: runs the registry's revision jobs (the training install; the service never does).

A worker claims the oldest queued job (registry/store.py claim_job) under a lease it renews every
few seconds from a heartbeat thread, together with the job's progress (round, epoch, ETA) and the
tail of its log. It revises the parent version from its checkpoint with the job's verdicts
(revision/revise.py: revision/rounds.py's rounds, then export with the parity check), and
registers the result as a *candidate* version (verified again, golden probe included) whose
lineage compares it with its parent, with its prototypes' nearest training images
(worker/neighbours.py). Promotion stays explicit unless the job asked for automatic
promotion and the candidate passes the gates (export's parity, verification, accuracy no more than
`max_accuracy_drop` below its parent's).

A worker that dies stops renewing its lease: the next claim after the lease ran out resumes the job
from the revision's last finished round (`revision_last.pt` in the job's folder); a job that has
outlived MAX_ATTEMPTS workers is marked failed with the reason. A job whose code raises is marked
failed with the error. Nothing is ever left "running" without a live lease.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from pathlib import Path

from protoserve.errors import ProtoserveError
from protoserve.verdicts import FIELDS, append_verdicts, parse_verdict
from registry.store import RegistryError
from registry.versions import Registry
from worker.neighbours import write_neighbours

LEASE_SECONDS = float(os.environ.get("PROTOSERVE_JOB_LEASE_SECONDS", "60"))
ROUND_EPOCH = re.compile(r"^round (\d+) epoch (\d+)/(\d+)")
ROUND_DONE = re.compile(r"^round (\d+):")


class JobLost(ProtoserveError):
    """The job's lease was taken over (this worker was presumed dead): stop working on it."""


class Heartbeat:
    """Renews a job's lease from a thread; collects log lines and turns them into progress."""

    def __init__(self, registry: Registry, job: dict, worker: str, lease: float):
        self.store, self.job_id, self.worker, self.lease = registry.store, job["id"], worker, lease
        settings = job["settings"]
        self.rounds = settings["rounds"] if settings["mode"] == "revise" else 1
        self.epochs = max(1, settings.get("epochs_per_round", 1)) if settings["mode"] == "revise" else 1
        self.progress = {"stage": "starting", "round": 0, "rounds": self.rounds, "epoch": 0, "epochs": self.epochs,
                         "eta_seconds": None, "elapsed_seconds": 0.0}
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
        """The revision's log function: keep the line, update progress; raise when the job was taken over."""
        if self.lost:
            raise JobLost(f"job {self.job_id}: its lease was taken over; this worker stops")
        with self.lock:
            self.pending.append(str(line).rstrip() + "\n")
            self._update(str(line))

    def stage(self, name: str) -> None:
        with self.lock:
            self.progress["stage"] = name
        self.beat()

    def _update(self, line: str) -> None:
        p = self.progress
        if m := ROUND_EPOCH.match(line):
            p.update(stage="training", round=int(m[1]), epoch=int(m[2]), epochs=int(m[3]))
            done = (int(m[1]) - 1) * int(m[3]) + int(m[2])
            total = self.rounds * int(m[3])
        elif m := ROUND_DONE.match(line):
            p.update(round=int(m[1]), epoch=p["epochs"])
            done, total = int(m[1]) * p["epochs"], self.rounds * p["epochs"]
        else:
            return
        elapsed = time.monotonic() - self.started
        p["eta_seconds"] = round(elapsed / done * (total - done), 1) if done and total > done else 0.0

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
               lease: float = LEASE_SECONDS, log=print) -> int:
    """Claim and run jobs until interrupted (or, with `once`, until no job is queued). Returns jobs run."""
    name, done = worker_name(), 0
    log(f"protoserve worker {name}: watching {registry.root} for revision jobs")
    while True:
        job = registry.store.claim_job(name, lease)
        if job is None:
            if once:
                return done
            time.sleep(poll_seconds)
            continue
        run_job(registry, job, name, data_root, lease, log)
        done += 1


def run_job(registry: Registry, job: dict, worker: str, data_root: str | None, lease: float, log=print) -> None:
    """Run one claimed job to done or failed (see the module docstring)."""
    log(f"job {job['id']}: revising {job['parent']} ({job['settings']['mode']}), attempt {job['attempts']}")
    with Heartbeat(registry, job, worker, lease) as beat:
        try:
            result = revise_version(registry, job, data_root, beat)
        except JobLost as e:
            log(str(e))
            return
        except Exception as e:  # any failure of the revision is the job's outcome, reported through the API
            beat.log(f"failed: {type(e).__name__}: {e}")
            beat.beat()
            registry.store.finish_job(job["id"], worker, error=f"{type(e).__name__}: {e}"[:2000])
            log(f"job {job['id']}: failed: {e}")
            return
    registry.store.finish_job(job["id"], worker, result=result)
    log(f"job {job['id']}: candidate {result['candidate']}" + (" promoted" if result.get("promoted") else ""))


def revise_version(registry: Registry, job: dict, data_root: str | None, beat: Heartbeat) -> dict:
    """The revision itself: verdicts file, revise + export, register the candidate, optional promotion."""
    from revision.revise import Parent, revise
    from revision.rounds import RevisionConfig

    settings, parent = job["settings"], registry.store.version(job["parent"])
    if parent.checkpoint is None:
        raise RegistryError(f"version {parent.version} has no checkpoint to revise")
    folder = registry.root / "jobs" / str(job["id"])
    verdicts = folder / "verdicts.jsonl"
    if not verdicts.exists():
        folder.mkdir(parents=True, exist_ok=True)
        rows = [registry.store.verdict(i) for i in settings["verdict_ids"]]
        append_verdicts(verdicts, [parse_verdict({k: r[k] for k in FIELDS}, f"verdict {r['id']}")
                                   for r in rows])
    revision = RevisionConfig(mode=settings["mode"], rounds=settings["rounds"],
                              epochs_per_round=settings.get("epochs_per_round", 1),
                              freeze_encoder=settings.get("freeze_encoder", True))
    run = folder / "run"
    version = f"{parent.version}-r{job['id']}"
    beat.stage("revising")
    result = revise(Parent(Path(parent.checkpoint), f"{parent.name}:{parent.version}", parent.name, parent.version),
                    run, revision, verdicts=str(verdicts), data_root=data_root, version=version,
                    resume=(run / "revision_last.pt").exists(), train_subset=settings.get("train_subset"),
                    log=beat.log)
    beat.stage("registering")
    row = registry.register(result.bundle.path, run / "checkpoint.pt", parent=parent.version, status="candidate",
                            job_id=job["id"])
    beat.stage("neighbours")
    try:  # what the page shows beside each prototype; the candidate stands without it
        write_neighbours(registry, row.version, data_root)
    except Exception as e:
        beat.log(f"nearest training images not computed: {type(e).__name__}: {e}")
    comparison = (row.lineage or {}).get("comparison", {})
    outcome = {"candidate": row.version, "comparison": comparison, "test_accuracy": {
        "parent": (parent.metrics or {}).get("test_accuracy"), "candidate": (row.metrics or {}).get("test_accuracy")},
        "parity": result.parity.model_dump(mode="json")}
    if settings.get("auto_promote"):
        outcome |= promote_if_gates_pass(registry, row.version, outcome["test_accuracy"],
                                         settings.get("max_accuracy_drop", 0.01), job["id"])
    beat.stage("done")
    return outcome


def promote_if_gates_pass(registry: Registry, candidate: str, accuracy: dict, max_drop: float, job_id: int) -> dict:
    """Automatic promotion: parity and verification passed already (export, register); accuracy gate here."""
    parent, new = accuracy.get("parent"), accuracy.get("candidate")
    if parent is None or new is None:
        return {"promoted": False, "gate": "no test accuracy to compare"}
    if new < parent - max_drop:
        return {"promoted": False, "gate": f"test accuracy {new:.4f} is more than {max_drop:.4f} below the "
                f"parent's {parent:.4f}"}
    registry.promote(candidate, actor=f"worker: job {job_id} (automatic)")
    return {"promoted": True, "gate": f"test accuracy {new:.4f} vs parent {parent:.4f} (max drop {max_drop:.4f})"}

