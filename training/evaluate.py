"""Figures of a trained PrototypeDL: the paper's test accuracy and training-set reconstruction error."""

from __future__ import annotations

from pathlib import Path

import torch

from training.checkpoint import load_checkpoint
from training.data import load_dataset, resolve_data_root
from training.prototypedl import PrototypeDL, class_identities


@torch.no_grad()
def reconstruction_error(model: PrototypeDL, images: torch.Tensor, batch_size: int = 1000) -> float:
    """Mean over images of the squared L2 distance between image and reconstruction (paper: 4.22)."""
    total = 0.0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        total += float(((model.decode(model.encode(x)) - x) ** 2).flatten(1).sum(1).sum())
    return total / len(images)


@torch.no_grad()
def accuracy(model: PrototypeDL, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model.classify(images[start:start + batch_size])
        correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
    return correct / len(images)


def evaluate_checkpoint(path: Path, data_root: str | None = None, batch_size: int = 1000) -> dict:
    """Test accuracy (reporting only) and the undeformed training-set reconstruction error."""
    model, config, payload = load_checkpoint(path)
    if config.model.family == "protopnet":
        from training.train_protopnet import evaluate_protopnet

        return evaluate_protopnet(model, config, payload, path, data_root, batch_size)
    d = config.data
    data = load_dataset(resolve_data_root(data_root, d.root), d.dataset, d.val_size, d.split_seed)
    return {
        "checkpoint": str(path),
        "epoch": payload["epoch"],
        "test_accuracy": accuracy(model, data["test"].images, data["test"].labels, batch_size),
        "val_accuracy": accuracy(model, data["val"].images, data["val"].labels, batch_size),
        "train_accuracy": accuracy(model, data["train"].images, data["train"].labels, batch_size),
        "train_reconstruction_error": reconstruction_error(model, data["train"].images, batch_size),
        "class_identities": class_identities(model.last_layer.weight),
    }
