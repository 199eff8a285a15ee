"""MNIST-format data sets (MNIST, Fashion-MNIST) read from the official IDX files.

The files live under a data root, gzipped or not. Each is checked (magic number, shape, size,
checksum) before use; a missing or damaged file is one DataError naming it.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import torch

from training.splits import DataError, Split

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# md5 of the uncompressed files (MNIST: the published sums, see shared/data/mnist/README.md) and
# of the gzipped files as distributed (Fashion-MNIST: the sums its authors and torchvision publish).
CHECKSUMS = {
    "mnist": {
        "raw": {
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
        "gz": {},
    },
    "fashion_mnist": {
        "raw": {},
        "gz": {
            "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    },
}

CLASS_NAMES = {
    "mnist": [str(d) for d in range(10)],
    "fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}

# torchvision's downloader puts the files here under the root.
TORCHVISION_DIRS = {"mnist": "MNIST/raw", "fashion_mnist": "FashionMNIST/raw"}


def _find(root: Path, dataset: str, name: str) -> Path:
    for folder in (root, root / TORCHVISION_DIRS[dataset]):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise DataError(f"{root / name}[.gz]: missing {dataset} file")


def read_idx(path: Path, dataset: str = "mnist", verify: bool = True) -> np.ndarray:
    """One IDX file as a uint8 array, checked against its header and published checksum."""
    raw_name = path.name.removesuffix(".gz")
    try:
        blob = path.read_bytes()
        data = gzip.decompress(blob) if path.suffix == ".gz" else blob
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if verify:
        sums = CHECKSUMS.get(dataset, {})
        if path.suffix == ".gz" and raw_name in sums.get("gz", {}):
            expected, actual = sums["gz"][raw_name], hashlib.md5(blob).hexdigest()
        elif raw_name in sums.get("raw", {}):
            expected, actual = sums["raw"][raw_name], hashlib.md5(data).hexdigest()
        else:
            expected = actual = None
        if expected != actual:
            raise DataError(f"{path}: md5 {actual} does not match the published {expected} (corrupt or wrong file)")
    if len(data) < 4:
        raise DataError(f"{path}: too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim not in (1, 3):
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise DataError(f"{path}: header says shape {shape} but holds {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def load_split(root: Path, dataset: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 28, 28] uint8 and labels [N] uint8 of 'train' (all 60,000) or 'test'."""
    images = read_idx(_find(root, dataset, FILES[f"{split}_images"]), dataset)
    labels = read_idx(_find(root, dataset, FILES[f"{split}_labels"]), dataset)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{root}: {split} images {images.shape} and labels {labels.shape} do not pair up")
    if labels.max() >= 10:
        raise DataError(f"{root}: {split} labels hold class {labels.max()}, expected 0-9")
    return images, labels


def _to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return Split(x, torch.from_numpy(labels.astype(np.int64)))


def load_mnist(root: Path, dataset: str = "mnist", val_size: int = 5000, split_seed: int = 0,
               train_subset: int | None = None) -> dict[str, Split]:
    """The paper's split of an IDX data set ("mnist" or "fashion_mnist"): 55,000 train / 5,000
    validation (fixed seed) / 10,000 test."""
    images, labels = load_split(root, dataset, "train")
    order = np.random.default_rng(split_seed).permutation(len(images))
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_subset is not None:
        train_idx = train_idx[:train_subset]
    test_images, test_labels = load_split(root, dataset, "test")
    return {
        "train": _to_split(images[train_idx], labels[train_idx]),
        "val": _to_split(images[val_idx], labels[val_idx]),
        "test": _to_split(test_images, test_labels),
    }


def download(root: Path, dataset: str = "mnist") -> None:
    """Fetch the IDX files with torchvision's downloader; only on the user's explicit request."""
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST}[dataset]
    root.mkdir(parents=True, exist_ok=True)
    try:
        for train in (True, False):
            cls(str(root), train=train, download=True)  # checks the md5 of each archive it fetches
    except (RuntimeError, OSError) as e:  # torchvision's downloader raises both when every mirror fails
        raise DataError(f"could not download {dataset} into {root} ({e})") from None
    for name in FILES.values():  # and the published sums of the files as read
        read_idx(_find(root, dataset, name), dataset)
