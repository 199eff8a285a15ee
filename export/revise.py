"""The revision worker: a model version + verdicts -> a revised checkpoint -> a new bundle version.

`protoserve revise` runs it in the foreground; the parent is a checkpoint, or a bundle (its
checkpoint is the `checkpoint.pt` beside it, checked against the manifest's sha256). The
consultation comes from a verdict file, the simulated user (data with object masks), or a person
at the terminal (training/revision.py runs the rounds). The revised checkpoint is exported as a
new bundle version whose manifest carries the lineage.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from bundle.manifest import read_bundle, sha256_file
from export.build import ExportResult, export_bundle
from protoserve.errors import ProtoserveError
from protoserve.verdicts import append_verdicts, check_ids, read_verdicts
from training.checkpoint import load_checkpoint
from training.datasets import dataset
from training.revision import (
    STATE_FILE,
    RevisionConfig,
    RevisionRun,
    file_consult,
    load_revision_record,
    simulated_consult,
)
from training.revision_families import ObjectMasks
from training.splits import resolve_data_root
from training.train_protopnet import load_run_data


class RevisionError(ProtoserveError):
    pass


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


def make_consult(mode: str, verdicts: str | None, simulate: bool, interactive: bool, n_prototypes: int,
                 out: Path, reviewer: str, train=None):
    if sum([simulate, interactive]) > 1:
        raise RevisionError("--simulate and --interactive exclude each other")
    if interactive:
        if not verdicts:
            raise RevisionError("--interactive needs --verdicts FILE (the answers are written there as they come)")
        from export.review_terminal import terminal_consult

        return terminal_consult(Path(verdicts), out / "rounds", reviewer, train)
    if simulate:
        inner = simulated_consult()
        if not verdicts:
            return inner

        def consult_and_record(r, model, judgements):
            given = inner(r, model, judgements)
            append_verdicts(verdicts, given)
            return given

        return consult_and_record
    if verdicts:
        given = read_verdicts(verdicts)
        check_ids(given, n_prototypes, verdicts)
        return file_consult(given)
    if mode != "prune":
        raise RevisionError(f"--mode {mode} needs verdicts: --verdicts FILE, --simulate or --interactive")
    return file_consult([])


def revise(parent: Parent, out: Path, settings: RevisionConfig, verdicts: str | None = None, simulate: bool = False,
           interactive: bool = False, reviewer: str = "user", data_root: str | None = None,
           name: str | None = None, version: str | None = None, resume: bool = False, export: bool = True,
           train_subset: int | None = None, log=print) -> ExportResult | None:
    """Run the revision into `out` (revision_last.pt after each round; checkpoint.pt at the end, beside
    bundle/ as in models/) and export `out`/bundle as name:version (default: the parent's name, its
    version + "-" + mode). `train_subset`: revise on the first N training images of the parent's split
    (recorded in the revised checkpoint's config, where a later revision starts from)."""
    out = Path(out)
    model, config, payload = load_checkpoint(parent.checkpoint)
    if train_subset is not None:
        if train_subset < 1:
            raise RevisionError(f"train subset {train_subset}: must be at least 1 training image")
        config = replace(config, data=replace(config.data, train_subset=train_subset))
    root = resolve_data_root(data_root, config.data.root)
    data = load_run_data(config, root)
    masks = object_masks(config, root, data) if simulate else None
    if simulate and masks is None:
        raise RevisionError(f"--simulate needs object masks; data set {config.data.dataset!r} has none")
    consult = make_consult(settings.mode, verdicts, simulate, interactive, model.prototypes.shape[0], out, reviewer,
                           data["train"])
    run = RevisionRun(model, config, settings, data, out, consult, masks,
                      parent_masked=load_revision_record(payload).get("masked"), log=log)
    if resume:
        run.resume()
    elif (out / STATE_FILE).exists():
        raise RevisionError(f"{out}: holds a revision already; pass --resume to continue it or choose another --out")
    run.run()
    run.save_revised(out / "checkpoint.pt", parent.tag, sha256_file(parent.checkpoint))
    if not export:
        return None
    version = version or f"{parent.version}-{settings.mode}"
    return export_bundle(out / "checkpoint.pt", out / "bundle", name or parent.name, version, data_root=str(root),
                         force=True, log=log)
