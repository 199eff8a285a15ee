"""A registry's revision job: a version plus its verdicts -> a registered candidate version.

The worker (worker/loop.py) claims the job and holds its lease; this module does the work: it
revises the parent from its checkpoint with the job's verdicts (revision/revise.py `revise`:
the rounds, then export with the parity check), registers the result as a *candidate* version
(verified again, golden probe included) whose lineage compares it with its parent, with its
prototypes' nearest training images (revision/neighbours.py). Promotion stays explicit unless the
job asked for automatic promotion and the candidate passes the gates (export's parity,
verification, accuracy no more than `max_accuracy_drop` below its parent's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from bundle.manifest import BundleError
from export.build import ParityError
from protoserve.revision_settings import QueuedRevision
from protoserve.verdicts import FIELDS, Verdict, VerdictError, parse_verdict
from registry.store import RegistryError
from registry.versions import Registry
from revision.neighbours import write_neighbours
from revision.revise import Consultation, Parent, TrainSubsetError, revise
from revision.rounds import STATE_FILE, ProgressEvent
from training.checkpoint import CheckpointError
from training.datasets import DatasetError
from training.splits import DataError


class ParentError(RegistryError):
    """The job's parent version cannot be revised: no longer registered, or registered without its checkpoint."""


# A failure's kind (protoserve/job_failures.py's sentences), first match wins: ParityError before any
# other export error, ParentError before any other registry error.
FAILURE_KINDS = ((ParityError, "parity"), (BundleError, "verification"), (CheckpointError, "checkpoint"),
                 (ParentError, "parent"), (VerdictError, "verdicts"), (TrainSubsetError, "train_subset"),
                 ((DataError, DatasetError), "data"),
                 ((MemoryError, torch.OutOfMemoryError), "memory"))


class JobReport(Protocol):
    """Where a job tells how it goes: log lines for people, its stage, the rounds' progress."""

    def log(self, line: str) -> None: ...

    def stage(self, name: str) -> None: ...

    def record(self, event: ProgressEvent) -> None: ...


def job_verdicts(registry: Registry, ids: list[int]) -> list[Verdict]:
    """The registry's verdicts of a job, as verdict objects."""
    rows = [registry.store.verdict(i) for i in ids]
    return [parse_verdict({k: r[k] for k in FIELDS}, f"verdict {r['id']}") for r in rows]


def failure_kind(error: BaseException) -> str:
    """What kind of failure a job's exception is (a key of protoserve/job_failures.py FAILURES)."""
    return next((kind for types, kind in FAILURE_KINDS if isinstance(error, types)), "other")


def failure_details(error: BaseException) -> dict:
    """What a failure's sentence names (the training subset's size and missing classes), else nothing."""
    return dict(getattr(error, "details", None) or {})


def parent_row(registry: Registry, version: str):
    """The parent's registry row, or ParentError when it cannot be revised."""
    try:
        parent = registry.store.version(version)
    except RegistryError as e:
        raise ParentError(str(e)) from None
    if parent.checkpoint is None:
        raise ParentError(f"version {parent.version} has no checkpoint to revise")
    return parent


def revise_version(registry: Registry, job_id: int, parent_version: str, job: QueuedRevision,
                   data_root: str | None, report: JobReport) -> dict:
    """The revision itself: revise + export, register the candidate, optional promotion."""
    parent = parent_row(registry, parent_version)
    run = registry.root / "jobs" / str(job_id) / "run"
    consultation = Consultation(job_verdicts(registry, job.verdict_ids), source=f"job {job_id}")
    report.stage("revising")
    result = revise(Parent(Path(parent.checkpoint), f"{parent.name}:{parent.version}", parent.name, parent.version),
                    job.settings(), consultation, run, data_root=data_root, version=f"{parent.version}-r{job_id}",
                    resume=(run / STATE_FILE).exists(), progress=report.record, log=report.log)
    report.stage("registering")
    row = registry.register(result.bundle.path, run / "checkpoint.pt", parent=parent.version, status="candidate",
                            job_id=job_id)
    report.stage("neighbours")
    try:  # what the page shows beside each prototype; the candidate stands without it
        write_neighbours(registry, row.version, data_root)
    except Exception as e:
        report.log(f"nearest training images not computed: {type(e).__name__}: {e}")
    comparison = (row.lineage or {}).get("comparison", {})
    outcome = {"candidate": row.version, "comparison": comparison, "test_accuracy": {
        "parent": (parent.metrics or {}).get("test_accuracy"), "candidate": (row.metrics or {}).get("test_accuracy")},
        "parity": result.parity.model_dump(mode="json")}
    if job.auto_promote:
        outcome |= promote_if_gates_pass(registry, row.version, outcome["test_accuracy"], job.max_accuracy_drop,
                                         job_id)
    report.stage("done")
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
