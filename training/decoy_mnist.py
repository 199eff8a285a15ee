"""Decoy-MNIST (Ross, Hughes, Doshi-Velez 2017): MNIST with a confounder that gives the label away.

Every image gets a small square (the decoy) in one of its four corners. In the training and
validation sets the square's shade encodes the label (255 - 25 y), so a model can be right by
reading the square; in the test set the shade is that of a random digit and the corner a new
random one, so relying on the square costs accuracy there. The adversarial test set gives the
square the shade of a wrong class: the sharpest measure of relying on the shortcut.

Each set keeps the object mask (the digit's ink, before the decoy is drawn) and the decoy mask,
which the simulated user needs. Generation is seeded: the same seed gives the same sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.mnist import load_split
from training.splits import Split

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


@dataclass(frozen=True)
class Confounder:
    """The decoy: a `size` x `size` square; where it goes and how bright it is.

    position: "random_corner" (one of the four, uniformly) or one corner's name for all images.
    shade: "label" (255 - step * y, the label's shade) for training and validation sets.
    """

    size: int = 4
    position: str = "random_corner"
    step: int = 25  # shade of label y is 255 - step * y

    def shade(self, labels: np.ndarray) -> np.ndarray:
        return (255 - self.step * labels.astype(np.int64)).clip(0, 255)

    def corners(self, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.position == "random_corner":
            return rng.integers(0, 4, size=n)
        if self.position not in CORNERS:
            raise ValueError(f"confounder position must be 'random_corner' or one of {CORNERS}, got {self.position!r}")
        return np.full(n, CORNERS.index(self.position))


def corner_slices(corner: int, size: int, height: int = 28, width: int = 28) -> tuple[slice, slice]:
    """(rows, cols) of a size x size square touching corner `corner` (index into CORNERS)."""
    top = corner in (0, 1)
    left = corner in (0, 2)
    rows = slice(0, size) if top else slice(height - size, height)
    cols = slice(0, size) if left else slice(width - size, width)
    return rows, cols


@dataclass
class DecoySet:
    images: np.ndarray  # uint8 [N, H, W], the decoy drawn in
    labels: np.ndarray  # int64 [N]
    object_masks: np.ndarray  # bool [N, H, W]: the digit's ink (pixel > 0 before the decoy)
    decoy_masks: np.ndarray  # bool [N, H, W]: the square
    corners: np.ndarray  # int [N], index into CORNERS
    shades: np.ndarray  # int [N], 0..255

    def __len__(self) -> int:
        return len(self.labels)

    def split(self) -> Split:
        """As a training Split: float32 [N, 1, H, W] in [0, 1] and int64 labels."""
        x = torch.from_numpy(self.images.astype(np.float32) / 255.0).unsqueeze(1)
        return Split(x, torch.from_numpy(self.labels.astype(np.int64)))


def add_decoys(images: np.ndarray, labels: np.ndarray, shade_labels: np.ndarray, corners: np.ndarray,
               confounder: Confounder) -> DecoySet:
    """Draw confounder squares of the shade of `shade_labels` at `corners` into copies of `images`."""
    out = images.copy()
    decoy = np.zeros(images.shape, dtype=bool)
    shades = confounder.shade(shade_labels)
    H, W = images.shape[1:]
    for i, corner in enumerate(corners):
        rows, cols = corner_slices(int(corner), confounder.size, H, W)
        out[i, rows, cols] = shades[i]
        decoy[i, rows, cols] = True
    objects = (images > 0) & ~decoy
    return DecoySet(out, labels.astype(np.int64), objects, decoy, corners.astype(np.int64), shades)


def decoy_sets(images: np.ndarray, labels: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray,
               seed: int, val_size: int, train_subset: int | None = None,
               confounder: Confounder = Confounder()) -> dict[str, DecoySet]:
    """train / val (label shade), test (random digit's shade, new random corner), test_adversarial
    (a wrong class's shade) and test_clean (no decoy: zero-size mask, same images)."""
    order = np.random.default_rng(seed).permutation(len(images))
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_subset is not None:
        train_idx = train_idx[:train_subset]
    sets = {}
    for k, (name, idx) in enumerate((("train", train_idx), ("val", val_idx))):
        rng = np.random.default_rng([seed, k])
        x, y = images[idx], labels[idx].astype(np.int64)
        sets[name] = add_decoys(x, y, y, confounder.corners(len(y), rng), confounder)
    y = test_labels.astype(np.int64)
    rng = np.random.default_rng([seed, 2])
    sets["test"] = add_decoys(test_images, y, rng.integers(0, 10, len(y)), confounder.corners(len(y), rng), confounder)
    rng = np.random.default_rng([seed, 3])
    wrong = (y + rng.integers(1, 10, len(y))) % 10  # uniform over the nine other classes
    sets["test_adversarial"] = add_decoys(test_images, y, wrong, confounder.corners(len(y), rng), confounder)
    sets["test_clean"] = DecoySet(test_images.copy(), y, test_images > 0, np.zeros(test_images.shape, dtype=bool),
                                  np.full(len(y), -1), np.zeros(len(y), dtype=np.int64))
    return sets


def load_decoy_mnist(root: Path, seed: int = 0, val_size: int = 5000, train_subset: int | None = None,
                     confounder: Confounder = Confounder()) -> dict[str, DecoySet]:
    """Decoy-MNIST from the official MNIST IDX files under `root` (see decoy_sets)."""
    images, labels = load_split(root, "mnist", "train")
    test_images, test_labels = load_split(root, "mnist", "test")
    return decoy_sets(images, labels, test_images, test_labels, seed, val_size, train_subset, confounder)


def load_decoy_dataset(root: Path, val_size: int = 5000, split_seed: int = 0,
                       train_subset: int | None = None, confounder: Confounder = Confounder()) -> dict[str, Split]:
    """train / val / test Splits of Decoy-MNIST (split_seed seeds the split and the decoys), the
    shape every data set's loader returns (training/datasets.py)."""
    sets = load_decoy_mnist(root, split_seed, val_size, train_subset, confounder)
    return {name: sets[name].split() for name in ("train", "val", "test")}
