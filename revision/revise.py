"""The one way into a revision: a parent model + settings + verdicts -> a revised checkpoint -> a new bundle.

`protoserve revise`, the registry's jobs (revision/job.py, run by the worker) and
benchmarks/revision.py all call `revise`. The parent is a checkpoint, or a bundle (its checkpoint
is the `checkpoint.pt` beside it, checked against the manifest's sha256). The consultation is the
verdicts given (objects; a verdict file is read by the CLI), the simulated user (data with object
masks), or a person at the terminal; revision/rounds.py runs the rounds. The revised checkpoint
is exported as a new bundle version whose manifest carries the lineage.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from bundle.manifest import read_bundle, sha256_file
from export.build import ExportResult, export_bundle
from protoserve.errors import ProtoserveError
from protoserve.revision_settings import RevisionSettings
from protoserve.verdicts import Verdict, append_verdicts, check_ids, read_verdicts
from revision.families import ObjectMasks, revision_family
from revision.rounds import (
    STATE_FILE,
    Consult,
    Progress,
    RevisionRun,
    file_consult,
    load_revision_record,
    simulated_consult,
)
from revision.terminal_review import terminal_consult
from training.checkpoint import load_checkpoint
from training.config import Config
from training.datasets import dataset, load_run_data
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
    what `revise` runs, and benchmarks/revision.py with its own data and evaluation sets."""
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
