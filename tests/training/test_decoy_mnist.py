"""Decoy-MNIST: the shade rule, the corners, the masks, and the seed."""

import numpy as np
import pytest

from training.decoy_mnist import Confounder, corner_slices, decoy_sets


def _digits(n, seed=0):
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    images[:, 6:22, 8:20] = rng.integers(1, 256, size=(n, 16, 12))  # ink only in the middle, as MNIST
    return images, rng.integers(0, 10, n).astype(np.uint8)


@pytest.fixture(scope="module")
def sets():
    images, labels = _digits(400)
    test_images, test_labels = _digits(200, seed=1)
    return decoy_sets(images, labels, test_images, test_labels, seed=7, val_size=100)


def _square_shade_and_corner(ds, i):
    for c in range(4):
        rows, cols = corner_slices(c, 4)
        if ds.decoy_masks[i, rows, cols].all():
            return int(ds.images[i, rows, cols].min()), int(ds.images[i, rows, cols].max()), c
    raise AssertionError("no square")


def test_train_and_val_shade_is_the_label(sets):
    for name in ("train", "val"):
        ds = sets[name]
        for i in range(len(ds)):
            low, high, corner = _square_shade_and_corner(ds, i)
            assert low == high == 255 - 25 * ds.labels[i]
            assert corner == ds.corners[i]
            assert ds.decoy_masks[i].sum() == 16
    assert len(sets["train"]) == 300 and len(sets["val"]) == 100


def test_corners_are_all_used_and_test_shade_is_random(sets):
    assert set(sets["train"].corners.tolist()) == {0, 1, 2, 3}
    test = sets["test"]
    assert np.mean(test.shades == 255 - 25 * test.labels) < 0.3  # random digit's shade: right 1 time in 10
    assert set(test.corners.tolist()) == {0, 1, 2, 3}
    adv = sets["test_adversarial"]
    assert not np.any(adv.shades == 255 - 25 * adv.labels)  # always a wrong class's shade
    assert not sets["test_clean"].decoy_masks.any()


def test_object_mask_is_the_ink_and_disjoint_from_the_decoy(sets):
    ds = sets["train"]
    assert not (ds.object_masks & ds.decoy_masks).any()
    assert ds.object_masks[:, 6:22, 8:20].all() and not ds.object_masks[:, :6].any()


def test_seeded_and_parametrised():
    images, labels = _digits(50)
    a = decoy_sets(images, labels, images, labels, seed=3, val_size=10)
    b = decoy_sets(images, labels, images, labels, seed=3, val_size=10)
    c = decoy_sets(images, labels, images, labels, seed=4, val_size=10)
    assert all(np.array_equal(a[k].images, b[k].images) for k in a)
    assert not np.array_equal(a["train"].images, c["train"].images)
    big = decoy_sets(images, labels, images, labels, seed=3, val_size=10,
                     confounder=Confounder(size=6, position="bottom_right", step=20))
    assert (big["train"].decoy_masks.sum(axis=(1, 2)) == 36).all()
    assert (big["train"].corners == 3).all()
    assert (big["train"].shades == 255 - 20 * big["train"].labels).all()


def test_config_decoy_position_reaches_the_training_data(mnist_root):
    from training.config import Config
    from training.datasets import load_run_data

    raw = {"data": {"dataset": "decoy_mnist", "val_size": 20, "train_subset": 50, "decoy_position": "top_left"}}
    data = load_run_data(Config.from_dict(raw), mnist_root)
    for name in ("train", "val", "test"):
        corner = data[name].images[:, 0, :4, :4]
        assert (corner == corner[:, :1, :1]).all() and (corner > 0).all(), name  # a full square, every image
    shades = (data["train"].images[:, 0, 0, 0] * 255).round().long()
    assert (shades == 255 - 25 * data["train"].labels).all()
    default = load_run_data(Config.from_dict({"data": {**raw["data"], "decoy_position": "random_corner"}}), mnist_root)
    assert (default["train"].images[:, 0, :4, :4].amin(dim=(1, 2)) == 0).any()  # other corners too


def test_config_refuses_an_unknown_decoy_position():
    from training.config import Config, ConfigError

    with pytest.raises(ConfigError, match="data.decoy_position must be one of"):
        Config.from_dict({"data": {"dataset": "decoy_mnist", "decoy_position": "centre"}})


def test_revision_benchmark_confounder_settings():
    from benchmarks.revision_decoy import CONFOUNDERS, baseline_config, output_dir, picture_prefix

    config = baseline_config("protopnet", 0, 100, 1, CONFOUNDERS["fixed-corner"])
    assert config.data.decoy_position == "top_left" and CONFOUNDERS["fixed-corner"].size == 4
    assert baseline_config("protopnet", 0, 100, 1).data.decoy_position == "random_corner"
    assert output_dir("square") == "runs/revision_bench" != output_dir("fixed-corner")
    assert picture_prefix("protopnet", "square") == "protopnet" != picture_prefix("protopnet", "fixed-corner")


def test_revision_benchmark_controls_train_every_round_without_a_user():
    from benchmarks.revision_decoy import DEFAULT_CONDITIONS, condition_settings

    assert "continued_trained" not in DEFAULT_CONDITIONS and "revision_trained" in DEFAULT_CONDITIONS
    control, user = condition_settings("continued_trained", 5, 1, 0)
    revision, revision_user = condition_settings("revision_trained", 5, 1, 0)
    assert not user and revision_user
    assert control == revision  # the same rounds and training: only the verdicts differ
    baseline, baseline_user = condition_settings("baseline", 5, 1, 0)
    assert not baseline_user and baseline.rounds == 1
