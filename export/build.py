"""Checkpoint -> bundle: `protoserve export`.

Steps: rebuild the model, export model.onnx and decoder.onnx, decode the prototypes to PNGs,
run the whole test set through PyTorch (eval) and ONNX Runtime (CPU), refuse to continue if
parity misses its limits, store a golden probe, write and re-read the manifest, and only then
move the finished directory to its place (a bundle is never half written).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from export.bundle import (
    Bundle,
    InputSpec,
    Manifest,
    Metrics,
    ParityFigures,
    ProbeSpec,
    PrototypeRow,
    TrainingInfo,
    read_bundle,
    sha256_file,
    write_manifest,
)
from export.onnx_export import DecoderGraph, PrototypeDLGraph, classifier_spec, decoder_spec, export_graph
from export.parity import describe, parity_failures, parity_figures
from export.runtime import open_session, verify_bundle
from protoserve.errors import ProtoserveError
from training.checkpoint import load_checkpoint
from training.data import CLASS_NAMES, Split, load_dataset, resolve_data_root
from training.prototypedl import PrototypeDL, class_identities

REPO = Path(__file__).resolve().parents[1]
PROBE_ATOL, PROBE_RTOL = 1e-5, 1e-4
BATCH_SIZE = 500


class ExportError(ProtoserveError):
    pass


class ParityError(ExportError):
    pass


@dataclass
class ExportResult:
    bundle: Bundle
    parity: ParityFigures


def export_bundle(checkpoint: Path, out: Path, name: str, version: str, data_root: str | None = None,
                  force: bool = False, test_images: int | None = None, log=print) -> ExportResult:
    """Write the bundle of `checkpoint` to `out`; parity on the first `test_images` (default: all)."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out}: exists; bundles are immutable, choose a new --out or pass --force")
    model, config, payload = load_checkpoint(checkpoint)
    test = load_dataset(resolve_data_root(data_root, config.data.root), config.data.dataset,
                        config.data.val_size, config.data.split_seed)["test"]
    if test_images is not None:
        test = Split(test.images[:test_images], test.labels[:test_images])

    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest, parity = _build(model, config, payload, checkpoint, test, staging, name, version, log)
        write_manifest(staging, manifest)
        verify_bundle(staging)
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(bundle=read_bundle(out), parity=parity)


def _build(model: PrototypeDL, config, payload: dict, checkpoint: Path, test: Split, staging: Path,
           name: str, version: str, log) -> tuple[Manifest, ParityFigures]:
    model_spec, dec_spec = classifier_spec(model), decoder_spec(model)
    export_graph(PrototypeDLGraph(model), model_spec, staging / model_spec.file)
    export_graph(DecoderGraph(model), dec_spec, staging / dec_spec.file)

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
                      test_images=len(labels), parity=parity)
    log(f"test accuracy {metrics.test_accuracy:.4f} (PyTorch), {metrics.onnx_test_accuracy:.4f} (ONNX Runtime)")
    probe_images = write_probe(model, test, staging / "probe.npz")
    c = model.cfg
    manifest = Manifest(
        name=name, version=version, family="prototypedl", created_at=datetime.now(UTC),
        class_names=CLASS_NAMES[config.data.dataset][:c.n_classes],
        input=InputSpec(channels=c.in_channels, height=c.input_size, width=c.input_size, value_range=(0.0, 1.0),
                        mean=[0.0] * c.in_channels, std=[1.0] * c.in_channels,
                        description="grey levels divided by 255 (0 = black background, 1 = white ink), "
                                    "as the IDX files store them; no normalisation"),
        model=model_spec, decoder=dec_spec,
        prototypes=write_prototypes(model, staging),
        metrics=metrics,
        probe=ProbeSpec(file="probe.npz", images=probe_images, atol=PROBE_ATOL, rtol=PROBE_RTOL),
        training=TrainingInfo(config=payload["config"], epoch=payload.get("epoch"),
                              metrics=_plain(payload.get("metrics") or {}),
                              checkpoint_sha256=sha256_file(checkpoint), **source_commit()),
    )
    return manifest, parity


@torch.no_grad()
def run_torch(model: PrototypeDL, images: torch.Tensor) -> dict[str, np.ndarray]:
    """PyTorch eval-mode outputs (the names of model.onnx) for all `images`, batch by batch."""
    graph = PrototypeDLGraph(model).eval()
    parts = [graph(images[i:i + BATCH_SIZE]) for i in range(0, len(images), BATCH_SIZE)]
    return {name: torch.cat([p[j] for p in parts]).numpy()
            for j, name in enumerate(("logits", "probabilities", "distances", "latent", "reconstruction"))}


def run_onnx(session, images: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    parts = [session.run(names, {"image": images[i:i + BATCH_SIZE]}) for i in range(0, len(images), BATCH_SIZE)]
    return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(names)}


@torch.no_grad()
def write_probe(model: PrototypeDL, test: Split, path: Path) -> int:
    """The golden probe: the first test image of each class, with PyTorch's outputs; returns its size."""
    labels = test.labels.numpy()
    index = [int(np.flatnonzero(labels == k)[0]) for k in np.unique(labels)]
    images = test.images[index]
    out = run_torch(model, images)
    decoded = DecoderGraph(model).eval()(torch.from_numpy(out["latent"])).numpy()
    arrays = {"input.image": images.numpy(), "test_index": np.array(index, dtype=np.int64)}
    arrays |= {f"output.{k}": v for k, v in out.items()}
    arrays |= {"decoder.input.latent": out["latent"], "decoder.output.reconstruction": decoded}
    np.savez(path, **arrays)
    return len(index)


@torch.no_grad()
def write_prototypes(model: PrototypeDL, staging: Path) -> list[PrototypeRow]:
    """Decode every prototype to prototypes/<id>.png; one table row each."""
    (staging / "prototypes").mkdir()
    pictures = model.decode(model.prototypes).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    W = model.last_layer.weight.detach()  # [K, m]
    identities = class_identities(W)
    rows = []
    for j, picture in enumerate(pictures):  # [C, H, W]
        image = f"prototypes/{j:03d}.png"
        Image.fromarray(picture[0] if picture.shape[0] == 1 else picture.transpose(1, 2, 0)).save(staging / image)
        rows.append(PrototypeRow(id=j, class_identity=identities[j], weights=W[:, j].tolist(), image=image))
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
