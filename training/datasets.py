"""The data-set table: everything that differs between the data sets a run can train on.

Each data set is one row in DATASETS, looked up with `dataset(name)` (a config's `data.dataset`);
nothing else branches on a data-set name. A row says how to load the train / val / test splits,
the input normalisation the loader applied, the class names, how the bundle describes its input,
and what the quality report and revision need of it: Decoy-MNIST's digit and decoy masks, or the
ink of grey-level digits as the object mask. Loaders take the run config's `data` and `model`
sections.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bundle.manifest import CanonicalForm
from protoserve.errors import ProtoserveError
from protoserve.named_table import NamedTable
from training import cub, image_folder
from training.decoy_mnist import Confounder, DecoySet, load_decoy_dataset, load_decoy_mnist
from training.mnist import CLASS_NAMES, load_mnist
from training.splits import Split

# How MNIST's digits were made (LeCun et al.): light ink on dark, the ink's bounding box fitted into
# 20x20 keeping its aspect ratio, then centred by its centre of mass in the 28x28 field.
MNIST_FORM = CanonicalForm(ink="light_on_dark", box=20, centre="mass",
                           description="light ink on a dark background; the ink's bounding box fitted into "
                                       "20x20 (aspect ratio kept) and centred by its centre of mass in 28x28")
GREY_DIGITS = ("grey levels divided by 255 (0 = black background, 1 = white ink), as the IDX files store them; "
               "no normalisation")


class DatasetError(ProtoserveError):
    """A data-set name the table does not have."""


@dataclass(frozen=True)
class DataSet:
    """One data set's row in the table (see the module docstring)."""
    name: str
    load: Callable[..., dict[str, Split]]  # (root, data config, model config) -> train / val / test
    class_names: Callable[[Path | None], list[str] | None]  # (root or None) -> names, None: "0", "1", ...
    description: str  # how the bundle's input was made from a picture (the manifest's input spec)
    mean: list[float] | None = None  # the normalisation the loader applied; None: raw [0, 1] pixels
    std: list[float] | None = None
    canonical: CanonicalForm | None = None  # how its inputs were drawn (for photo-like uploads)
    elastic: bool = True  # elastic deformation suits it as augmentation (digits, not photographs)
    ink_masks: bool = False  # the object of an image is its ink (grey-level digits on black)
    # (root, data config) -> the Decoy-MNIST sets with their digit and decoy masks; None without them
    decoy_sets: Callable[..., dict[str, DecoySet]] | None = None


def _decoy_sets(root: Path, d) -> dict[str, DecoySet]:
    return load_decoy_mnist(root, d.split_seed, d.val_size, d.train_subset, Confounder(position=d.decoy_position))


def _mnist_row(name: str, **row) -> DataSet:
    return DataSet(name=name, load=lambda root, d, m: load_mnist(root, name, d.val_size, d.split_seed, d.train_subset),
                   class_names=lambda root: CLASS_NAMES[name], description=GREY_DIGITS, ink_masks=True, **row)


DATASETS: NamedTable[DataSet] = NamedTable("data set", DatasetError)
for _row in (
    _mnist_row("mnist", canonical=MNIST_FORM),
    _mnist_row("fashion_mnist"),
    DataSet(name="decoy_mnist", class_names=lambda root: CLASS_NAMES["mnist"], description=GREY_DIGITS,
            load=lambda root, d, m: load_decoy_dataset(root, d.val_size, d.split_seed, d.train_subset,
                                                       Confounder(position=d.decoy_position)),
            decoy_sets=_decoy_sets),
    DataSet(name="cub", class_names=lambda root: cub.class_names(root) if root else None,
            load=lambda root, d, m: cub.load_cub(root, m.input_size, d.val_size, d.split_seed, d.train_subset,
                                                 d.crop_to_bbox),
            mean=cub.IMAGENET_MEAN, std=cub.IMAGENET_STD, elastic=False,
            description="RGB divided by 255, resized to the input size (cropped to the bird's bounding box in "
                        "training), then normalised with the ImageNet mean and std"),
    DataSet(name="folder", class_names=lambda root: image_folder.class_names(root) if root else None,
            load=lambda root, d, m: image_folder.load_image_folder(root, m.input_size, m.in_channels, m.n_classes,
                                                                    d.val_size, d.split_seed, d.train_subset),
            elastic=False,
            description="pixels divided by 255 (grey, RGB or RGBA as the model's channels), resized to the "
                        "input size; no normalisation"),
):
    DATASETS.register(_row.name, _row)


def dataset(name: str) -> DataSet:
    """The table's row of a data-set name; DatasetError naming the known ones otherwise."""
    return DATASETS.lookup(name)


def load_run_data(config, root: Path) -> dict[str, Split]:
    """train / val / test splits of a run config's data set under `root`."""
    return dataset(config.data.dataset).load(root, config.data, config.model)


def input_normalization(name: str) -> tuple[list[float] | None, list[float] | None]:
    """(mean, std) the data set's loader applied, or (None, None) for raw [0, 1] pixels."""
    row = dataset(name)
    return row.mean, row.std


def class_names(config, root: Path | None) -> list[str]:
    """The names of a run's classes: the data set's, else "0", "1", ... (n_classes of them)."""
    K = config.model.n_classes
    names = dataset(config.data.dataset).class_names(root)
    return names[:K] if names else [str(k) for k in range(K)]
