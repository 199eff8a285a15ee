"""The `folder` data set: torchvision's ImageFolder layout read into the model's size and channels."""

from __future__ import annotations

import pytest
import torch
from folder_data import SHAPES, write_shapes
from tiny_configs import tiny_config_dict

from training.config import Config, ConfigError
from training.datasets import class_names, dataset, input_normalization, load_run_data
from training.image_folder import load_image_folder
from training.splits import DataError


def _config(**model) -> Config:
    raw = tiny_config_dict()
    raw["data"] = {"dataset": "folder", "val_size": 6, "split_seed": 0}
    raw["model"] = {"in_channels": 3, "input_size": 16, "n_classes": 3, "n_prototypes": 6, **model}
    return Config.from_dict(raw, source="test")


def test_a_folder_loads_at_the_models_size_and_channels_with_a_seeded_split(tmp_path):
    root = write_shapes(tmp_path / "shapes", per_class=10)
    config = _config()
    data = load_run_data(config, root)
    assert [len(data[s]) for s in ("train", "val", "test")] == [18, 6, 6]
    assert data["train"].images.shape[1:] == (3, 16, 16) and data["train"].images.dtype == torch.float32
    assert 0.0 <= float(data["train"].images.min()) and float(data["train"].images.max()) <= 1.0
    assert set(data["train"].labels.tolist()) == {0, 1, 2}
    again = load_run_data(config, root)
    assert torch.equal(again["val"].images, data["val"].images)
    assert class_names(config, root) == list(SHAPES)
    assert input_normalization("folder") == (None, None) and not dataset("folder").elastic


def test_grey_models_read_colour_folders_as_grey_and_train_test_folders_are_kept(tmp_path):
    write_shapes(tmp_path / "layout" / "train", per_class=6)
    write_shapes(tmp_path / "layout" / "test", per_class=2, seed=1)
    data = load_image_folder(tmp_path / "layout", input_size=20, in_channels=1, n_classes=3, val_size=3)
    assert [len(data[s]) for s in ("train", "val", "test")] == [15, 3, 6]
    assert data["test"].images.shape[1:] == (1, 20, 20)


def test_a_folder_that_does_not_fit_the_config_is_one_error(tmp_path):
    root = write_shapes(tmp_path / "shapes", per_class=3)
    with pytest.raises(DataError, match="3 class folders, the config's model.n_classes is 4"):
        load_image_folder(root, 16, 3, 4, 2)
    with pytest.raises(DataError, match="val_size 5 leaves no training pictures"):
        load_image_folder(root, 16, 3, 3, 5)
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path / "shapes" / "circle", 16, 3, 3, 1)


def test_the_config_names_the_data_sets_of_the_table():
    raw = tiny_config_dict()
    raw["data"]["dataset"] = "imagenet"
    with pytest.raises(ConfigError, match="data.dataset must be one of 'mnist', 'fashion_mnist', 'decoy_mnist', "
                                          "'cub', 'folder'"):
        Config.from_dict(raw, source="test")
