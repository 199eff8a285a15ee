"""Image folders in torchvision's ImageFolder layout: one sub-folder of pictures per class.

    <root>/<class name>/<picture>            every picture of the data set, or
    <root>/train/<class name>/<picture>      the training pictures and, beside them,
    <root>/test/<class name>/<picture>       the test pictures

Class names are the sub-folders' names in sorted order (class k is the k-th). Pictures of any size
and mode are converted to the model's channels (1: grey, 3: RGB, 4: RGBA), resized to input_size x
input_size and scaled to [0, 1], without normalisation, and held in memory. The validation split is
drawn from the training pictures with a fixed seed; without a test/ folder the test split is drawn
the same way, after it, from the one folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.splits import DataError, Split

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # torchvision's, less .pgm/.ppm
MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def _bases(root: Path) -> tuple[Path, Path | None]:
    """(the folder of the training pictures, the folder of the test pictures or None)."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root / "train", root / "test"
    return root, None


def class_folders(root: Path) -> list[Path]:
    """The class sub-folders of `root` (of its train/ folder when it has train/ and test/), sorted by name."""
    base = _bases(Path(root))[0]
    folders = sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if not folders:
        raise DataError(f"{base}: no class sub-folders (one folder of pictures per class)")
    return folders


def class_names(root: Path) -> list[str]:
    return [folder.name for folder in class_folders(root)]


def _pictures(base: Path, names: list[str]) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, name in enumerate(names):
        found = sorted(p for p in (base / name).glob("*") if p.suffix.lower() in EXTENSIONS)
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"{base}: no pictures ({', '.join(EXTENSIONS)}) in the class folders")
    return files, labels


def _read(path: Path, size: int, channels: int) -> np.ndarray:
    """One picture as float32 [C, size, size] in [0, 1]."""
    try:
        img = Image.open(path).convert(MODES[channels])
    except OSError as e:
        raise DataError(f"{path}: not a readable image ({e})") from None
    array = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _split(files: list[Path], labels: list[int], size: int, channels: int) -> Split:
    images = np.stack([_read(path, size, channels) for path in files]) if files else \
        np.zeros((0, channels, size, size), dtype=np.float32)
    return Split(torch.from_numpy(images), torch.tensor(labels, dtype=torch.long))


def load_image_folder(root: Path, input_size: int, in_channels: int, n_classes: int, val_size: int,
                      split_seed: int = 0, train_subset: int | None = None) -> dict[str, Split]:
    """train / val (from the training pictures, fixed seed) / test splits of an ImageFolder-layout folder."""
    if in_channels not in MODES:
        raise DataError(f"model.in_channels {in_channels}: a picture folder gives 1 (grey), 3 (RGB) or 4 (RGBA)")
    root = Path(root)
    names = class_names(root)
    if len(names) != n_classes:
        raise DataError(f"{root}: {len(names)} class folders, the config's model.n_classes is {n_classes}")
    train_base, test_base = _bases(root)
    files, labels = _pictures(train_base, names)
    held_out = val_size if test_base else 2 * val_size
    if not 0 < held_out < len(files):
        raise DataError(f"{root}: val_size {val_size} leaves no training pictures (the folder has {len(files)})")
    order = np.random.default_rng(split_seed).permutation(len(files))
    val, train = sorted(order[:val_size]), sorted(order[held_out:])
    if test_base:
        test_files, test_labels = _pictures(test_base, names)
    else:
        test = sorted(order[val_size:held_out])
        test_files, test_labels = [files[i] for i in test], [labels[i] for i in test]
    if train_subset is not None:
        train = train[:train_subset]

    def pick(index):
        return [files[i] for i in index], [labels[i] for i in index]

    return {"train": _split(*pick(train), input_size, in_channels),
            "val": _split(*pick(val), input_size, in_channels),
            "test": _split(test_files, test_labels, input_size, in_channels)}
