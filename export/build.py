"""Checkpoint -> bundle: `protoserve export`.

Steps: rebuild the model, export model.onnx (and the family's decoder.onnx, if it has one), write
the prototype PNGs and table rows the family's table entry describes (training/families.py:
PrototypeDL the decoded prototypes; ProtoPNet each pushed patch, its source image with boxes and its
activation map, redrawn from the push provenance the checkpoint holds), run the whole test set
through PyTorch (eval) and ONNX Runtime (CPU), refuse to continue if parity misses its limits, store
a golden probe, write and re-read the manifest, add the explanation-quality report (export/quality/,
on the validation split), and only then move the finished directory to its place (a bundle is never
half written).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from bundle.families import family as serving_family
from bundle.manifest import (
    Bundle,
    DomainCalibration,
    InputSpec,
    Lineage,
    Manifest,
    Metrics,
    ParityFigures,
    ProbeSpec,
    PrototypeRow,
    TrainingInfo,
    drift_quantiles,
    read_bundle,
    sha256_file,
    write_manifest,
)
from bundle.parity import OTHER, output_limits
from bundle.runtime import open_session, verify_bundle
from export.calibration import DEFAULT_FALSE_ALARM_RATE, calibrate
from export.onnx_export import (
    classifier_graph,
    classifier_outputs,
    classifier_spec,
    decoder_graph,
    decoder_spec,
    export_graph,
)
from export.outlier_figures import outlier_figures
from export.parity import describe, parity_failures, parity_figures
from export.quality.report import QualityOptions, write_quality_report
from protoserve.errors import ProtoserveError
from training.checkpoint import load_checkpoint
from training.config import Config, ConfigError
from training.datasets import class_names, dataset, input_normalization, load_run_data
from training.families import PrototypeRecord, family_of
from training.splits import Split, resolve_data_root

REPO = Path(__file__).resolve().parents[1]
BATCH_SIZE = 500
DEFAULT_QUALITY = QualityOptions()


class ExportError(ProtoserveError):
    pass


class ParityError(ExportError):
    pass


@dataclass
class ExportResult:
    bundle: Bundle
    parity: ParityFigures


def export_bundle(checkpoint: Path, out: Path, name: str, version: str, data_root: str | None = None,
                  force: bool = False, test_images: int | None = None, log=print,
                  false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
                  quality: QualityOptions | None = DEFAULT_QUALITY, parent: Path | None = None) -> ExportResult:
    """Write the bundle of `checkpoint` to `out`; parity on the first `test_images` (default: all); the
    out-of-domain threshold calibrated on the validation split for `false_alarm_rate`; the
    explanation-quality report on the validation split unless `quality` is None. `parent`: the bundle
    this checkpoint was retrained to replace (its lineage names it, mode "retrain")."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out}: exists; bundles are immutable, choose a new --out or pass --force")
    parent_manifest = read_bundle(parent).manifest if parent is not None else None
    model, config, payload = load_checkpoint(checkpoint)
    root = resolve_data_root(data_root, config.data.root)
    data = load_run_data(config, root)
    test = data["test"]
    if test_images is not None:
        test = Split(test.images[:test_images], test.labels[:test_images])
    if not isinstance(test.images, torch.Tensor):  # image folders load lazily; parity needs the arrays
        test = Split(test.images[torch.arange(len(test))], test.labels)

    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest, parity = _build(model, config, payload, checkpoint, test, staging, name, version, log,
                                  push_set=data["train"], root=root)
        domain = calibrate_domain(staging / manifest.model.file, data["val"], manifest, false_alarm_rate, log)
        manifest = manifest.model_copy(update={"domain": domain})
        outliers = outlier_figures(staging / manifest.model.file, manifest, test.images.numpy(), config, run_onnx, log)
        if outliers is not None:
            manifest = manifest.model_copy(update={"domain": domain.model_copy(update={"outliers": outliers})})
        if parent_manifest is not None:
            manifest = manifest.model_copy(update={"lineage": retrain_lineage(parent_manifest, manifest)})
        write_manifest(staging, manifest)
        if quality is not None:
            write_quality_report(staging, str(root), options=quality, log=log)
        verify_bundle(staging)
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(bundle=read_bundle(out), parity=parity)


def _build(model: nn.Module, config, payload: dict, checkpoint: Path, test: Split, staging: Path,
           name: str, version: str, log, push_set: Split | None = None,
           root: Path | None = None) -> tuple[Manifest, ParityFigures]:
    model_spec = classifier_spec(model)
    export_graph(classifier_graph(model), model_spec, staging / model_spec.file)
    decoder = decoder_graph(model)
    dec_spec = decoder_spec(model) if decoder is not None else None
    if decoder is not None:
        export_graph(decoder, dec_spec, staging / dec_spec.file)

    torch_out = run_torch(model, test.images)
    session, _ = open_session(staging / model_spec.file, device="cpu")
    onnx_out = run_onnx(session, test.images.numpy())
    parity = parity_figures(torch_out, onnx_out)
    log(describe(parity))
    failures = parity_failures(parity)
    if failures:
        raise ParityError(f"{staging / model_spec.file}: parity with PyTorch fails: {'; '.join(failures)}")

    labels = test.labels.numpy()
    metrics = Metrics(test_accuracy=float(np.mean(torch_out["probabilities"].argmax(1) == labels)),
                      onnx_test_accuracy=float(np.mean(onnx_out["probabilities"].argmax(1) == labels)),
                      test_images=len(labels), parity=parity,
                      nearest_distance_quantiles=drift_quantiles(onnx_out["distances"].min(axis=1)))  # all active
    log(f"test accuracy {metrics.test_accuracy:.4f} (PyTorch), {metrics.onnx_test_accuracy:.4f} (ONNX Runtime)")
    probe_images = write_probe(model, test, staging / "probe.npz")
    records = family_of(model).prototype_records(model, push_set, *input_normalization(config.data.dataset))
    prototypes = mark_masked(write_prototypes(records, staging), payload.get("revision") or {})
    manifest = Manifest(
        name=name, version=version, family=model.cfg.family, created_at=datetime.now(UTC),
        class_names=class_names(config, root),
        input=input_spec(config),
        model=model_spec, decoder=dec_spec,
        prototypes=prototypes,
        metrics=metrics,
        probe=ProbeSpec(file="probe.npz", images=probe_images, atol=OTHER.atol, rtol=OTHER.rtol,
                        limits=output_limits([t.name for t in model_spec.outputs])),
        training=TrainingInfo(config=payload["config"], epoch=payload.get("epoch"),
                              metrics=_plain(payload.get("metrics") or {}),
                              checkpoint_sha256=sha256_file(checkpoint), **source_commit()),
        lineage=_lineage(payload.get("revision") or {}),
    )
    return manifest, parity


def calibrate_domain(model_file: Path, validation: Split, manifest: Manifest, false_alarm_rate: float,
                     log=print) -> DomainCalibration:
    """The out-of-domain calibration (export/calibration.py) through the staged model.onnx, on the
    validation split only."""
    session, _ = open_session(model_file, device="cpu")
    images = validation.images[torch.arange(len(validation))] if not isinstance(validation.images, torch.Tensor) \
        else validation.images

    features = serving_family(manifest.family).domain_features
    features = features if manifest.model.output(features) is not None else None

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        out = run_onnx(session, x.astype(np.float32, copy=False))
        return out["probabilities"], out["distances"], out[features] if features else None

    class_of = np.array([row.class_identity for row in manifest.prototypes])
    active = np.array([row.status == "active" for row in manifest.prototypes])
    domain = calibrate(run, images.numpy(), active, class_of, len(manifest.class_names), false_alarm_rate,
                       features=features)
    log(f"out-of-domain score {domain.score} (validation AUROC against {domain.proxy}: {domain.candidates}); "
        f"threshold {domain.threshold:.4g} for a {false_alarm_rate:g} false-alarm rate on {domain.images} "
        "validation images")
    return domain


def retrain_lineage(parent: Manifest, manifest: Manifest) -> Lineage:
    """The lineage of a version retrained to replace `parent`: no verdicts, both test accuracies."""
    if manifest.lineage is not None:
        raise ExportError(f"{manifest.tag}: a revised checkpoint carries its own lineage; export it without --parent")
    if parent.family != manifest.family:
        raise ExportError(f"--parent {parent.tag} is a {parent.family} model, the checkpoint a {manifest.family} model")
    return Lineage(parent=parent.tag, parent_checkpoint_sha256=parent.training.checkpoint_sha256, mode="retrain",
                   rounds=0, config=config_changes(_with_defaults(parent.training.config),
                                                     _with_defaults(manifest.training.config)),
                   comparison={"test_accuracy": {"parent": parent.metrics.test_accuracy,
                                                 "retrained": manifest.metrics.test_accuracy}})


def _with_defaults(config: dict) -> dict:
    """A training config as the current code reads it: settings added since it was written take their
    defaults, so that a setting missing from an older config is not reported as a change."""
    try:
        return Config.from_dict(config).to_dict()
    except ConfigError:  # written by a newer version of the code: compared as it is
        return config


def config_changes(parent: dict, retrained: dict, prefix: str = "") -> dict:
    """What a retraining changed in the training config: {"section.key": {"parent": ..., "retrained": ...}}
    for every setting that differs (a section only one of them has appears whole, the other side null).
    The whole config is in each manifest's training.config; this is the part that tells them apart."""
    changes = {}
    for key in [*parent, *(k for k in retrained if k not in parent)]:
        a, b = parent.get(key), retrained.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes |= config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes[f"{prefix}{key}"] = {"parent": a, "retrained": b}
    return changes


def _lineage(revision: dict) -> Lineage | None:
    return Lineage(**revision["lineage"]) if revision.get("lineage") else None


def mark_masked(rows: list[PrototypeRow], revision: dict) -> list[PrototypeRow]:
    """Rows of the prototypes a revision masked get status "masked" and keep the class they stood for
    before (a zero column has no most-negative weight to read it from)."""
    masked, identities = set(revision.get("masked") or []), revision.get("class_identities") or {}
    return [row.model_copy(update={"status": "masked",
                                   "class_identity": int(identities.get(str(row.id), row.class_identity))})
            if row.id in masked else row for row in rows]


def input_spec(config) -> InputSpec:
    """The manifest's input spec: exactly the preprocessing the model was trained on."""
    c, row = config.model, dataset(config.data.dataset)
    return InputSpec(channels=c.in_channels, height=c.input_size, width=c.input_size, value_range=(0.0, 1.0),
                     mean=row.mean or [0.0] * c.in_channels, std=row.std or [1.0] * c.in_channels,
                     description=row.description, canonical=row.canonical)


@torch.no_grad()
def run_torch(model: nn.Module, images: torch.Tensor) -> dict[str, np.ndarray]:
    """PyTorch eval-mode outputs (the names of model.onnx) for all `images`, batch by batch."""
    graph = classifier_graph(model).eval()
    parts = [graph(images[i:i + BATCH_SIZE]) for i in range(0, len(images), BATCH_SIZE)]
    return {name: torch.cat([p[j] for p in parts]).numpy() for j, name in enumerate(classifier_outputs(model))}


def run_onnx(session, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of `session` for all `images`, batch by batch, by name."""
    names = [o.name for o in session.get_outputs()]
    parts = [session.run(names, {"image": images[i:i + BATCH_SIZE]}) for i in range(0, len(images), BATCH_SIZE)]
    return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(names)}


@torch.no_grad()
def write_probe(model: nn.Module, test: Split, path: Path) -> int:
    """The golden probe: the first test image of each class, with PyTorch's outputs; returns its size."""
    labels = test.labels.numpy()
    index = [int(np.flatnonzero(labels == k)[0]) for k in np.unique(labels)]
    images = test.images[index]
    out = run_torch(model, images)
    arrays = {"input.image": images.numpy(), "test_index": np.array(index, dtype=np.int64)}
    arrays |= {f"output.{k}": v for k, v in out.items()}
    decoder = decoder_graph(model)
    if decoder is not None:
        decoded = decoder.eval()(torch.from_numpy(out["latent"])).numpy()
        arrays |= {"decoder.input.latent": out["latent"], "decoder.output.reconstruction": decoded}
    np.savez(path, **arrays)
    return len(index)


def write_prototypes(records: list[PrototypeRecord], staging: Path) -> list[PrototypeRow]:
    """prototypes/<id>.png (the first picture) and prototypes/<id>_<kind>.png (the others, named in the
    provenance as "<kind>_image"); one table row per prototype, ids in table order."""
    (staging / "prototypes").mkdir()
    rows = []
    for j, record in enumerate(records):
        files = {kind: f"prototypes/{j:03d}.png" if i == 0 else f"prototypes/{j:03d}_{kind}.png"
                 for i, kind in enumerate(record.pictures)}
        for kind, picture in record.pictures.items():
            picture.save(staging / files[kind])
        extra = {f"{kind}_image": file for i, (kind, file) in enumerate(files.items()) if i > 0}
        rows.append(PrototypeRow(id=j, class_identity=record.class_identity, weights=record.weights,
                                 provenance={**record.provenance, **extra} if record.provenance else None,
                                 image=files[next(iter(files))]))
    return rows


def source_commit() -> dict:
    """The git commit of the code doing the export, and whether the work tree had changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip() != ""
    except (OSError, subprocess.CalledProcessError):
        return {"source_commit": None, "source_dirty": None}
    return {"source_commit": commit, "source_dirty": dirty}


def _plain(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _move_into_place(staging: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.replaced"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:
        staging.rename(out)
