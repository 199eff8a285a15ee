"""PNG pictures of a PrototypeDL model: the paper's Fig. 2, Fig. 3, Table 1, Table 2, and the curves."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from training.checkpoint import load_checkpoint  # noqa: E402
from training.config import Config  # noqa: E402
from training.datasets import dataset, load_run_data  # noqa: E402
from training.families import FamilyError, config_family  # noqa: E402
from training.prototypedl import PrototypeDL, class_identities  # noqa: E402
from training.splits import resolve_data_root  # noqa: E402


def _show(ax, image: torch.Tensor) -> None:
    """One image [C, H, W] in [0, 1], grey or colour, without axes."""
    array = image.detach().cpu().numpy()
    if array.shape[0] == 1:
        ax.imshow(array[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.clip(array.transpose(1, 2, 0), 0, 1))
    ax.set_xticks([])
    ax.set_yticks([])


@torch.no_grad()
def decoded_prototypes(model: PrototypeDL) -> torch.Tensor:
    return model.decode(model.prototypes)


@torch.no_grad()
def plot_reconstructions(model: PrototypeDL, images: torch.Tensor, path: Path) -> Path:
    """Fig. 2: training images (top row) and their reconstructions (bottom row)."""
    recon = model.decode(model.encode(images))
    fig, axes = plt.subplots(2, len(images), figsize=(1.1 * len(images), 2.4))
    for i in range(len(images)):
        _show(axes[0, i], images[i])
        _show(axes[1, i], recon[i])
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("decoded")
    fig.suptitle("Training images and their reconstructions (Fig. 2)")
    return _save(fig, path)


def plot_prototypes(model: PrototypeDL, class_names: list[str], path: Path) -> Path:
    """Fig. 3: every prototype through the decoder, titled with its class identity."""
    pictures = decoded_prototypes(model)
    identities = class_identities(model.last_layer.weight)
    m = len(pictures)
    cols = min(m, 15)
    rows = (m + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j in range(m):
        ax = axes.flat[j]
        ax.axis("on")
        _show(ax, pictures[j])
        ax.set_title(f"p{j}: {class_names[identities[j]]}", fontsize=8)
    fig.suptitle("Decoded prototypes and their class identities (Fig. 3)")
    return _save(fig, path)


def plot_weight_matrix(model: PrototypeDL, class_names: list[str], path: Path) -> Path:
    """Table 1: W transposed, one row per prototype with its picture, most negative weight boxed."""
    pictures = decoded_prototypes(model)
    weights = model.last_layer.weight.detach().cpu().numpy().T  # [m, K]
    m, k = weights.shape
    fig = plt.figure(figsize=(1.0 + 0.7 * k, 0.5 * m + 1))
    grid = fig.add_gridspec(m, 2, width_ratios=[1, k], wspace=0.05, hspace=0.1)
    limit = np.abs(weights).max()
    table = fig.add_subplot(grid[:, 1])
    table.imshow(weights, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    for j in range(m):
        for c in range(k):
            table.text(c, j, f"{weights[j, c]:.2f}", ha="center", va="center", fontsize=6)
        most_negative = int(weights[j].argmin())
        table.add_patch(Rectangle((most_negative - 0.5, j - 0.5), 1, 1, fill=False, lw=2, ec="black"))
        _show(fig.add_subplot(grid[j, 0]), pictures[j])
    table.set_xticks(range(k), class_names, fontsize=7)
    table.set_yticks([])
    table.set_title("Transposed weight matrix W (most negative weight per prototype boxed; Table 1)", fontsize=9)
    return _save(fig, path)


@torch.no_grad()
def plot_distances(model: PrototypeDL, image: torch.Tensor, label: str, path: Path) -> Path:
    """Table 2: one test image and its squared latent distance to every prototype."""
    distances = ((model.encode(image[None]) - model.prototypes) ** 2).sum(1)
    logits = model.last_layer(distances[None])[0]
    pictures = decoded_prototypes(model)
    m = len(pictures)
    fig, axes = plt.subplots(1, m + 1, figsize=(1.0 * (m + 1), 1.9))
    _show(axes[0], image)
    axes[0].set_title(f"input ({label})\npred {int(logits.argmax())}", fontsize=7)
    nearest = int(distances.argmin())
    for j in range(m):
        _show(axes[j + 1], pictures[j])
        axes[j + 1].set_xlabel(f"{float(distances[j]):.2f}", fontsize=8,
                               fontweight="bold" if j == nearest else "normal")
    fig.suptitle("Distance from a test image to every prototype (Table 2)", fontsize=9)
    return _save(fig, path)


def plot_curves(metrics_path: Path, path: Path) -> Path:
    """Loss terms, accuracies per epoch, and validation accuracy against wall-clock time."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for term in ("E", "R1", "R2"):
        axes[0].plot(epochs, [r[f"train_{term}"] for r in rows], label=term)
    axes[0].plot(epochs, [r["train_R"] / 10 for r in rows], label="R / 10")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("epoch")
    axes[0].set_title("training loss terms")
    axes[0].legend()
    axes[1].plot(epochs, [r["train_accuracy"] for r in rows], label="train (deformed)")
    axes[1].plot(epochs, [r["val_accuracy"] for r in rows], label="validation")
    axes[1].set_ylim(max(0.0, min(r["val_accuracy"] for r in rows) - 0.01), 1.0)
    axes[1].set_xlabel("epoch")
    axes[1].set_title("accuracy")
    axes[1].legend()
    axes[2].plot([r["wall_seconds"] / 60 for r in rows], [r["val_accuracy"] for r in rows])
    axes[2].set_ylim(axes[1].get_ylim())
    axes[2].set_xlabel("wall-clock minutes")
    axes[2].set_title("validation accuracy against time")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def visualize_checkpoint(checkpoint: Path, out: Path, data_root: str | None = None,
                         metrics: str | None = None, seed: int = 0) -> list[Path]:
    """`protoserve visualize`: the pictures of the checkpoint's family, and the training curves."""
    model, config, _ = load_checkpoint(checkpoint)
    entry = config_family(config)
    if entry.pictures is None:
        raise FamilyError(f"{checkpoint}: {entry.name} has no pictures to draw from a checkpoint; "
                          f"{entry.pictures_note}")
    written = entry.pictures(model, config, Path(out), data_root, seed)
    metrics_path = Path(metrics) if metrics else Path(checkpoint).parent / "metrics.jsonl"
    if metrics_path.is_file():
        written.append(plot_curves(metrics_path, Path(out) / "curves.png"))
    return written


def prototypedl_figures(model: PrototypeDL, config: Config, out: Path, data_root: str | None = None,
                        seed: int = 0) -> list[Path]:
    """The paper's Fig. 2 and 3 and Tables 1 and 2 as PNGs."""
    d = config.data
    root = resolve_data_root(data_root, d.root)
    data = load_run_data(dataclasses.replace(config, data=dataclasses.replace(d, train_subset=None)), root)
    names = dataset(d.dataset).class_names(root)
    if not names or len(names) != config.model.n_classes:
        names = [str(c) for c in range(config.model.n_classes)]
    rng = np.random.default_rng(seed)
    picks = torch.from_numpy(rng.choice(len(data["train"]), size=10, replace=False))
    test = data["test"]
    # The paper's Table 2 shows a 6; take the first test image of class 6 (or the first image).
    sixes = (test.labels == 6).nonzero()
    index = int(sixes[0]) if len(sixes) else 0
    written = [
        plot_reconstructions(model, data["train"].images[picks], out / "fig2_reconstructions.png"),
        plot_prototypes(model, names, out / "fig3_prototypes.png"),
        plot_weight_matrix(model, names, out / "table1_weights.png"),
        plot_distances(model, test.images[index], names[int(test.labels[index])], out / "table2_distances.png"),
    ]
    return written
