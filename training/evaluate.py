"""Figures of a trained model: accuracy on each split (the test set for reporting only) and each
family's own figures (PrototypeDL: training-set reconstruction error; ProtoPNet: push purity)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from training.checkpoint import load_checkpoint
from training.config import Config
from training.datasets import load_run_data
from training.families import config_family
from training.protopnet import ProtoPNet
from training.prototypedl import PrototypeDL, class_identities
from training.push import push_purity
from training.splits import Split, resolve_data_root


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, batch_size: int = 1000, device="cpu") -> float:
    """Fraction of `split` that model.classify labels correctly (eval mode, batch by batch)."""
    model.eval()
    correct = 0
    for start in range(0, len(split), batch_size):
        x = split.images[start:start + batch_size].to(device)
        correct += int((model.classify(x).argmax(1) == split.labels[start:start + batch_size].to(device)).sum())
    return correct / max(1, len(split))


@torch.no_grad()
def reconstruction_error(model: PrototypeDL, images: torch.Tensor, batch_size: int = 1000) -> float:
    """Mean over images of the squared L2 distance between image and reconstruction (the paper's figure)."""
    total = 0.0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        total += float(((model.decode(model.encode(x)) - x) ** 2).flatten(1).sum(1).sum())
    return total / len(images)


def split_accuracies(model: nn.Module, data: dict[str, Split], batch_size: int) -> dict[str, float]:
    """test_accuracy, val_accuracy and train_accuracy of `model`."""
    return {f"{name}_accuracy": accuracy(model, data[name], batch_size) for name in ("test", "val", "train")}


def evaluate_prototypedl(model: PrototypeDL, data: dict[str, Split], batch_size: int = 1000) -> dict:
    """Accuracies, the undeformed training-set reconstruction error and the prototypes' classes
    (the last two where the model has a decoder and prototypes: the ablation's variants may not)."""
    figures = split_accuracies(model, data, batch_size)
    if model.decoder is not None:
        figures["train_reconstruction_error"] = reconstruction_error(model, data["train"].images, batch_size)
    if model.prototypes is not None:
        figures["class_identities"] = class_identities(model.last_layer.weight)
    return figures


def evaluate_protopnet(model: ProtoPNet, data: dict[str, Split], batch_size: int = 1000) -> dict:
    """Accuracies, push purity and how many prototypes were pushed."""
    return {**split_accuracies(model, data, batch_size),
            "push_purity": push_purity(model, data["train"].labels),
            "pushed_prototypes": int((model.push_source[:, 0] >= 0).sum()),
            "class_identities": model.class_identities()}


def evaluate_checkpoint(path: Path, data_root: str | None = None, batch_size: int = 1000) -> dict:
    """`protoserve evaluate`: the figures of the checkpoint's family on its run's data."""
    model, config, payload = load_checkpoint(path)
    data = run_data(config, data_root)
    return {"checkpoint": str(path), "epoch": payload["epoch"],
            **config_family(config).evaluate(model, data, batch_size)}


def run_data(config: Config, data_root: str | None = None) -> dict[str, Split]:
    """The splits of the run's dataset, under `data_root` or the config's / environment's root."""
    return load_run_data(config, resolve_data_root(data_root, config.data.root))
