"""The data a run trains on, as its config names it: MNIST-like IDX files or CUB-200-2011 image folders."""

from __future__ import annotations

from pathlib import Path

from training.config import Config
from training.cub import IMAGENET_MEAN, IMAGENET_STD, load_cub
from training.data import Split, load_dataset


def load_run_data(config: Config, root: Path) -> dict[str, Split]:
    """train / val / test splits of config.data.dataset under `root`."""
    d = config.data
    if d.dataset == "cub":
        return load_cub(root, config.model.input_size, d.val_size, d.split_seed, d.train_subset, d.crop_to_bbox)
    return load_dataset(root, d.dataset, d.val_size, d.split_seed, d.train_subset, d.decoy_position)


def input_normalization(dataset: str) -> tuple[list[float] | None, list[float] | None]:
    """(mean, std) the data loader applied, or (None, None) for raw [0, 1] pixels."""
    return (IMAGENET_MEAN, IMAGENET_STD) if dataset == "cub" else (None, None)
