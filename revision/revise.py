"""The one way into a revision: a parent model + settings + verdicts -> a revised checkpoint -> a new bundle.

`protoserve revise`, the registry's jobs (`revise_version`, below, run by the worker) and
benchmarks/revision_decoy.py all call `revise`. The parent is a checkpoint, or a bundle (its checkpoint
is the `checkpoint.pt` beside it, checked against the manifest's sha256). The consultation is the
verdicts given (objects; a verdict file is read by the CLI), the simulated user (data with object
masks), or a person at the terminal; revision/rounds.py runs the rounds. The revised checkpoint
is exported as a new bundle version whose manifest carries the lineage.

A registry's job (`revise_version`): the worker (worker/loop.py) claims it and holds its lease;
this module revises the parent version from its checkpoint with the job's verdicts, registers the
result as a *candidate* version (verified again, golden probe included) whose lineage compares it
with its parent, with its prototypes' nearest training images (revision/neighbours.py). Promotion
stays explicit unless the job asked for automatic promotion and the candidate passes the gates
(export's parity, verification, accuracy no more than `max_accuracy_drop` below its parent's).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch

from bundle.manifest import BundleError, read_bundle, sha256_file
from export.build import ExportResult, ParityError, export_bundle
from protoserve.errors import ProtoserveError
from registry.revision_settings import QueuedRevision, RevisionSettings
from registry.store import RegistryError, VersionRow
from registry.verdicts import FIELDS, Verdict, VerdictError, append_verdicts, check_ids, parse_verdict, read_verdicts
from registry.versions import Registry
from revision.families import ObjectMasks, revision_family
from revision.neighbours import write_neighbours
from revision.rounds import (
    STATE_FILE,
    Consult,
    Progress,
    ProgressEvent,
    RevisionRun,
    file_consult,
    load_revision_record,
    simulated_consult,
)
from revision.terminal_review import terminal_consult
from training.checkpoint import CheckpointError, load_checkpoint
from training.config import Config
from training.datasets import DatasetError, dataset, load_run_data
from training.splits import DataError, Split, resolve_data_root


class RevisionError(ProtoserveError):
    pass


class TrainSubsetError(DataError):
    """Training images without an example of a class the model's prototypes are pushed onto."""

    def __init__(self, images: int, classes: list[int]):
        super().__init__(f"the training subset of {images} images has no example of class(es) {classes}, which "
                         "prototypes stand for (push puts each onto a patch of its class); use a larger train_subset")
        self.details = {"images": images, "classes": ", ".join(str(c) for c in classes)}


def check_push_classes(model, train: Split) -> None:
    """TrainSubsetError when push needs a class the training images lack (families that push: ProtoPNet)."""
    family = revision_family(model)
    if not family.pushes_onto_own_class:
        return
    missing = sorted(set(family.class_identities(model)) - set(train.labels.tolist()))
    if missing:
        raise TrainSubsetError(len(train), missing)


@dataclass
class Parent:
    checkpoint: Path
    tag: str | None  # name:version of the parent bundle
    name: str
    version: str


def resolve_parent(checkpoint: str | None, bundle: str | None) -> Parent:
    """The parent's checkpoint and tag; a bundle's checkpoint must be the one it was exported from."""
    if bundle is None:
        if checkpoint is None:
            raise RevisionError("give the model to revise: --checkpoint FILE or --bundle DIR")
        return Parent(Path(checkpoint), None, "revised", "0.0.0")
    b = read_bundle(bundle)
    m = b.manifest
    path = Path(checkpoint) if checkpoint else Path(bundle).resolve().parent / "checkpoint.pt"
    if not path.is_file():
        raise RevisionError(f"{path}: the bundle's checkpoint is not there; pass --checkpoint")
    if m.training.checkpoint_sha256 and sha256_file(path) != m.training.checkpoint_sha256:
        raise RevisionError(f"{path}: not the checkpoint {m.tag} was exported from (sha256 differs)")
    return Parent(path, m.tag, m.name, m.version)


def object_masks(config, root: Path, data: dict):
    """What the simulated user knows: Decoy-MNIST's digit and decoy masks, MNIST-like ink; else None."""
    row = dataset(config.data.dataset)
    if row.decoy_sets is not None:
        return ObjectMasks.from_decoy(row.decoy_sets(root, config.data)["train"])
    if row.ink_masks:
        return ObjectMasks.from_split(data["train"])
    return None


@dataclass(frozen=True)
class Consultation:
    """Where a revision's verdicts come from: the verdicts given, the simulated user, or a person at the
    terminal. The simulated user's and the person's answers are appended to `record` when it is set."""

    verdicts: list[Verdict] | None = None  # None: none given
    simulate: bool = False
    interactive: bool = False
    record: Path | None = None
    reviewer: str = "user"
    source: str = "verdicts"  # what the verdicts are called in an error: a file, a job

    @classmethod
    def from_flags(cls, verdicts: str | None, simulate: bool, interactive: bool, reviewer: str) -> Consultation:
        """`protoserve revise`'s flags: --verdicts FILE is read, or (with --simulate / --interactive) appended to."""
        if simulate and interactive:
            raise RevisionError("--simulate and --interactive exclude each other")
        if interactive and not verdicts:
            raise RevisionError("--interactive needs --verdicts FILE (the answers are written there as they come)")
        if simulate or interactive:
            return cls(simulate=simulate, interactive=interactive, reviewer=reviewer,
                       record=Path(verdicts) if verdicts else None)
        return cls(read_verdicts(verdicts) if verdicts else None, source=verdicts or "verdicts")


def make_consult(consultation: Consultation, mode: str, n_prototypes: int, out: Path, train=None):
    c = consultation
    if c.interactive:
        return terminal_consult(c.record, out / "rounds", c.reviewer, train)
    if c.simulate:
        return simulated_consult() if c.record is None else _recorded(simulated_consult(), c.record)
    if c.verdicts is not None:
        check_ids(c.verdicts, n_prototypes, c.source)
        return file_consult(c.verdicts)
    if mode != "prune":
        raise RevisionError(f"--mode {mode} needs verdicts: --verdicts FILE, --simulate or --interactive")
    return file_consult([])


def _recorded(consult, path: Path):
    """A consult whose verdicts are also appended to the verdict file at `path`."""

    def consult_and_record(r, model, judgements):
        given = consult(r, model, judgements)
        append_verdicts(path, given)
        return given

    return consult_and_record


def revise_model(model, config: Config, settings: RevisionSettings, data: dict[str, Split], consult: Consult, out: Path,
                 masks: ObjectMasks | None = None, eval_sets: dict[str, Split] | None = None,
                 parent_masked: list[int] | None = None, resume: bool = False, progress: Progress | None = None,
                 log=print) -> RevisionRun:
    """The rounds of one revision of a loaded model on loaded data, into `out` (resumed with `resume`):
    what `revise` runs, and benchmarks/revision_decoy.py with its own data and evaluation sets."""
    run = RevisionRun(model, config, settings, data, out, consult, masks, eval_sets, parent_masked, log=log,
                      progress=progress)
    if resume:
        run.resume()
    elif (out / STATE_FILE).exists():
        raise RevisionError(f"{out}: holds a revision already; pass --resume to continue it or choose another --out")
    run.run()
    return run


def revise(parent: Parent, settings: RevisionSettings, consultation: Consultation, out: Path,
           data_root: str | None = None, name: str | None = None, version: str | None = None,
           resume: bool = False, export: bool = True, progress: Progress | None = None,
           log=print) -> ExportResult | None:
    """Run the revision into `out` (revision_last.pt after each round; checkpoint.pt at the end, beside
    bundle/ as in models/) and export `out`/bundle as name:version (default: the parent's name, its
    version + "-" + mode). `settings.train_subset`: revise on the first N training images of the parent's
    split (recorded in the revised checkpoint's config, where a later revision starts from)."""
    out = Path(out)
    model, config, payload = load_checkpoint(parent.checkpoint)
    if settings.train_subset is not None:
        config = replace(config, data=replace(config.data, train_subset=settings.train_subset))
    root = resolve_data_root(data_root, config.data.root)
    data = load_run_data(config, root)
    check_push_classes(model, data["train"])
    masks = object_masks(config, root, data) if consultation.simulate else None
    if consultation.simulate and masks is None:
        raise RevisionError(f"--simulate needs object masks; data set {config.data.dataset!r} has none")
    consult = make_consult(consultation, settings.mode, model.prototypes.shape[0], out, data["train"])
    run = revise_model(model, config, settings, data, consult, out, masks=masks, resume=resume,
                       parent_masked=load_revision_record(payload).get("masked"), progress=progress, log=log)
    run.save_revised(out / "checkpoint.pt", parent.tag, sha256_file(parent.checkpoint))
    if not export:
        return None
    version = version or f"{parent.version}-{settings.mode}"
    return export_bundle(out / "checkpoint.pt", out / "bundle", name or parent.name, version, data_root=str(root),
                         force=True, log=log)


# -- a registry's revision job ----------------------------------------------------------------
class ParentError(RegistryError):
    """The job's parent version cannot be revised: no longer registered, or registered without its checkpoint."""


# A failure's kind (registry/job_failures.py's sentences), first match wins: ParityError before any
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
    """What kind of failure a job's exception is (a key of registry/job_failures.py FAILURES)."""
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
    version = f"{parent.version}-r{job_id}"
    row = own_candidate(registry, version, job_id)
    if row is None:
        report.stage("revising")
        checkpoint = registry.checkpoint_path(parent.version)  # with s3:// versions, downloaded and verified
        result = revise(Parent(checkpoint, f"{parent.name}:{parent.version}", parent.name, parent.version),
                        job.settings(), consultation, run, data_root=data_root, version=version,
                        resume=(run / STATE_FILE).exists(), progress=report.record, log=report.log)
        report.stage("registering")
        row = registry.register(result.bundle.path, run / "checkpoint.pt", parent=parent.version,
                                status="candidate", job_id=job_id)
        parity = result.parity
    else:  # an earlier attempt registered it, then its worker stopped: what is left is the rest of the job
        report.log(f"candidate {row.version} was registered by an earlier attempt of this job; finishing the job")
        parity = registry.verify(row.version).manifest.metrics.parity
    report.stage("neighbours")
    try:  # what the page shows beside each prototype; the candidate stands without it
        write_neighbours(registry, row.version, data_root)
    except Exception as e:
        report.log(f"nearest training images not computed: {type(e).__name__}: {e}")
    comparison = (row.lineage or {}).get("comparison", {})
    outcome = {"candidate": row.version, "comparison": comparison, "test_accuracy": {
        "parent": (parent.metrics or {}).get("test_accuracy"), "candidate": (row.metrics or {}).get("test_accuracy")},
        "parity": None if parity is None else parity.model_dump(mode="json")}
    if job.auto_promote:
        outcome |= promote_if_gates_pass(registry, row.version, outcome["test_accuracy"], job.max_accuracy_drop,
                                         job_id)
    report.stage("done")
    return outcome


def own_candidate(registry: Registry, version: str, job_id: int) -> VersionRow | None:
    """The candidate's row when an earlier attempt of this job registered it (its worker was stopped after
    registering, before the job was marked done), else None; RegistryError when the version is registered
    by anything else (another job, or by hand): versions are immutable, and that one is not this job's."""
    row = registry.store.find_version(version)
    if row is None:
        return None
    if row.job_id != job_id:
        by = f"job {row.job_id}" if row.job_id is not None else "hand (no job)"
        raise RegistryError(f"version {version!r} is registered already, by {by}, not by job {job_id}; versions "
                            "are immutable")
    return row


def promote_if_gates_pass(registry: Registry, candidate: str, accuracy: dict, max_drop: float, job_id: int) -> dict:
    """Automatic promotion: parity and verification passed already (export, register); accuracy gate here."""
    parent, new = accuracy.get("parent"), accuracy.get("candidate")
    if parent is None or new is None:
        return {"promoted": False, "gate": "no test accuracy to compare"}
    if new < parent - max_drop:
        return {"promoted": False, "gate": f"test accuracy {new:.4f} is more than {max_drop:.4f} below the "
                f"parent's {parent:.4f}"}
    actor = f"worker: job {job_id} (automatic)"
    if not any(c["action"] == "promote" and c["version"] == candidate and c["actor"] == actor
               for c in registry.store.changes()):  # not promoted by an earlier attempt of this job already
        registry.promote(candidate, actor=actor)
    return {"promoted": True, "gate": f"test accuracy {new:.4f} vs parent {parent:.4f} (max drop {max_drop:.4f})"}
