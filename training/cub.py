"""Image folders in the CUB-200-2011 layout (the paper's bird experiment), read lazily from disk.

    <root>/images.txt              "<image id> <path under images/>"
    <root>/train_test_split.txt    "<image id> <1 = train, 0 = test>"
    <root>/image_class_labels.txt  "<image id> <class, from 1>"
    <root>/classes.txt             "<class> <name>"                       (optional)
    <root>/bounding_boxes.txt      "<image id> <x> <y> <width> <height>"  (optional: crop to the bird)
    <root>/segmentations/<path with .png>                                  (optional foreground masks)

The masks are not used to train (neither is the paper's): after each push they measure where the
prototypes landed, the fraction of each prototype's high-activation box on the bird
(training/push.py object_overlap), in the training log, metrics.jsonl and the bundle's provenance.
A prototype mostly on background is the one to reject in an interactive revision.

Images are cropped to their bounding box (when asked and present), resized to input_size x
input_size, scaled to [0, 1] and normalised with the ImageNet mean and std (what torchvision's
pretrained backbones expect). A validation split is drawn from the training images with a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.splits import DataError, Split

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _table(root: Path, name: str, required: bool = True) -> dict[int, list[str]] | None:
    path = root / name
    if not path.is_file():
        if required:
            raise DataError(f"{path}: missing (CUB-200-2011 layout)")
        return None
    rows = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            rows[int(parts[0])] = parts[1:]
        except ValueError:
            raise DataError(f"{path}:{n}: expected '<image id> ...', got {line!r}") from None
    return rows


class FolderImages:
    """Indexable like a tensor of images [N, 3, S, S]: files are read when indexed."""

    def __init__(self, files: list[Path], boxes: list[tuple[float, float, float, float] | None], size: int,
                 mask_files: list[Path | None] | None = None):
        self.files, self.boxes, self.size = files, boxes, size
        self.mask_files = mask_files or [None] * len(files)
        self.shape = (len(files), 3, size, size)

    def __len__(self) -> int:
        return len(self.files)

    def _crop(self, img: Image.Image, i: int) -> Image.Image:
        if self.boxes[i] is not None:
            x, y, w, h = self.boxes[i]
            img = img.crop((int(x), int(y), int(np.ceil(x + w)), int(np.ceil(y + h))))
        return img

    def mask(self, i: int) -> np.ndarray | None:
        """Image i's foreground mask (bool [S, S]) cropped and resized as the image is, or None when
        the folder has no segmentation for it."""
        path = self.mask_files[i]
        if path is None or not path.is_file():
            return None
        try:
            img = Image.open(path).convert("L")
        except OSError as e:
            raise DataError(f"{path}: not a readable segmentation mask ({e})") from None
        return np.asarray(self._crop(img, i).resize((self.size, self.size), Image.NEAREST)) > 127

    def load(self, i: int) -> torch.Tensor:
        try:
            img = Image.open(self.files[i]).convert("RGB")
        except OSError as e:
            raise DataError(f"{self.files[i]}: not a readable image ({e})") from None
        img = self._crop(img, i).resize((self.size, self.size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int):
            return self.load(index)
        if isinstance(index, slice):
            index = range(*index.indices(len(self)))
        elif isinstance(index, torch.Tensor):
            index = index.tolist()
        return torch.stack([self.load(int(i)) for i in index]) if len(index) else torch.empty(0, *self.shape[1:])


def mask_path(root: Path, image_path: str) -> Path:
    return root / "segmentations" / Path(image_path).with_suffix(".png")


def segmentation_mask(root: Path, image_path: str) -> np.ndarray | None:
    """The foreground mask (bool [H, W]) of one image, when the folder has segmentations."""
    path = mask_path(root, image_path)
    if not path.is_file():
        return None
    return np.asarray(Image.open(path).convert("L")) > 127


def load_cub(root: Path, input_size: int = 224, val_size: int = 500, split_seed: int = 0,
             train_subset: int | None = None, crop_to_bbox: bool = True) -> dict[str, Split]:
    """train / val (from the training images, fixed seed) / test splits of a CUB-layout folder."""
    root = Path(root)
    images = _table(root, "images.txt")
    split = _table(root, "train_test_split.txt")
    labels = _table(root, "image_class_labels.txt")
    boxes = _table(root, "bounding_boxes.txt", required=False) if crop_to_bbox else None
    ids = sorted(images)
    missing = [i for i in ids if i not in split or i not in labels]
    if missing:
        raise DataError(f"{root}: image id {missing[0]} lacks a train/test split or a class label")
    classes = sorted({int(labels[i][0]) for i in ids})
    if classes[0] != 1:
        raise DataError(f"{root / 'image_class_labels.txt'}: classes must count from 1")

    def make(subset: list[int]) -> Split:
        files = [root / "images" / images[i][0] for i in subset]
        bbox = [tuple(float(v) for v in boxes[i][:4]) if boxes and i in boxes else None for i in subset]
        y = torch.tensor([int(labels[i][0]) - 1 for i in subset], dtype=torch.long)
        masks = [mask_path(root, images[i][0]) for i in subset] if (root / "segmentations").is_dir() else None
        return Split(FolderImages(files, bbox, input_size, masks), y)

    train_ids = [i for i in ids if split[i][0] == "1"]
    test_ids = [i for i in ids if split[i][0] == "0"]
    if not 0 < val_size < len(train_ids):
        raise DataError(f"{root}: val_size {val_size} must be between 1 and {len(train_ids) - 1} "
                        f"(the folder has {len(train_ids)} training images)")
    order = np.random.default_rng(split_seed).permutation(len(train_ids))
    val = [train_ids[k] for k in sorted(order[:val_size])]
    train = [train_ids[k] for k in sorted(order[val_size:])]
    if train_subset is not None:
        train = train[:train_subset]
    return {"train": make(train), "val": make(val), "test": make(test_ids)}


def class_names(root: Path) -> list[str] | None:
    table = _table(Path(root), "classes.txt", required=False)
    return [table[k][0] for k in sorted(table)] if table else None
