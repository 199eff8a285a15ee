"""Outlier exposure (training/outlier_exposure.py): the margin term on the prototype distances, computed
in both families' training steps, and lowering the outliers' typicality on a tiny model."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from tiny_configs import tiny_config_dict, tiny_protopnet_dict

from export.calibration import fit_gaussian
from protoserve.domain_scores import mahalanobis
from training.config import Config, ConfigError
from training.outlier_exposure import ProfileMargin, auroc, margin_term, running_batchnorm
from training.outliers import build_outliers
from training.train_protopnet import ProtoPNetTrainer
from training.train_prototypedl import PrototypeDLTrainer

OE = {"weight": 1.0, "per_unit": 2, "batch_share": 0.5}


def test_margin_term_is_zero_beyond_the_margin_and_pushes_near_outliers_away():
    inside = torch.tensor([[1.0, 5.0], [2.0, 6.0], [3.0, 4.0]])
    far = torch.tensor([[10.0, 12.0]])
    loss, parts = margin_term(inside, far, quantile=1.0)
    assert float(loss) == 0.0 and parts["oe_margin"] == 3.0 and parts["oe_inside_margin"] == 0.0
    near = torch.tensor([[1.5, 9.0]], requires_grad=True)
    loss, parts = margin_term(inside, near, quantile=1.0)
    assert abs(float(loss.detach()) - 0.5) < 1e-6 and parts["oe_inside_margin"] == 1.0
    loss.backward()
    assert near.grad[0, 0] < 0 and near.grad[0, 1] == 0  # descending raises the nearest distance only


def test_fixed_margin_pushes_outliers_and_leaves_the_digits_alone():
    for pull in (True, False):
        inside = torch.tensor([[1.0, 5.0], [2.0, 6.0], [3.0, 4.0]], requires_grad=True)
        near = torch.tensor([[1.5, 9.0]], requires_grad=True)
        loss, parts = margin_term(inside, near, quantile=1.0, pull_digits=pull)
        assert abs(float(loss.detach()) - 0.5) < 1e-6 and parts["oe_margin"] == 3.0  # the same value both ways
        loss.backward()
        assert near.grad[0, 0] < 0
        if pull:  # descending shrinks the digits' nearest distances
            assert bool((inside.grad[:, 0] > 0).all()) and bool((inside.grad[:, 1] == 0).all())
        else:
            assert inside.grad is None


def _profiles(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n squared-distance profiles over 4 prototypes, two classes: class c near prototypes 2c and 2c + 1."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    z = 1.0 + 0.1 * torch.randn(n, 4, generator=g)
    z[torch.arange(n), 2 * labels] -= 0.8
    z[torch.arange(n), 2 * labels + 1] -= 0.8
    return z.square(), torch.nn.functional.one_hot(labels, 2).float() * 5.0


def test_profile_margin_pushes_an_unusual_profile_only_and_matches_the_served_score():
    digits, logits = _profiles(400)
    profile = ProfileMargin(n_classes=2, momentum=1.0, shrinkage=0.0)  # momentum 1: this batch's estimate
    typical = digits[:1].clone().requires_grad_(True)
    loss, parts = profile.term(digits, logits, typical, logits[:1], quantile=0.99)
    assert float(loss.detach()) > 0.5 and parts["oe_profile_inside"] == 1.0  # a digit's profile sits inside
    loss.backward()
    assert typical.grad.abs().sum() > 0
    unusual = torch.full((1, 4), 0.04)  # near every prototype at once: no class's pattern
    loss, parts = profile.term(digits, logits, unusual, logits[:1], quantile=0.99)
    assert float(loss) == 0.0 and parts["oe_profile_inside"] == 0.0
    # the squared distance of the served rule's prototype_mahalanobis part, fitted on the same digits
    labels = logits.argmax(1).numpy()
    means, precision = fit_gaussian(np.sqrt(digits.numpy().astype(np.float64)), labels, 2)
    served = mahalanobis(digits.numpy(), labels, means, precision)
    ours = profile.squared(digits.sqrt().double(), logits.argmax(1)).numpy()
    assert np.allclose(ours, served, rtol=1e-4)


def test_profile_margin_leaves_the_digits_alone(tmp_path, mnist_root):
    digits, logits = _profiles(200)
    digits.requires_grad_(True)
    outliers = _profiles(8, seed=1)[0].requires_grad_(True)
    loss, _ = ProfileMargin(n_classes=2).term(digits, logits, outliers, logits[:8], quantile=0.99)
    loss.backward()
    assert digits.grad is None and outliers.grad is not None
    config = tiny_protopnet_dict()
    config["train"]["epochs"] = 1
    config["schedule"].update(warm_epochs=0, push_start=1, last_layer_epochs=1)
    config["outlier_exposure"] = {**OE, "profile_weight": 1.0, "batchnorm": "batch"}
    metrics = ProtoPNetTrainer(Config.from_dict(config), tmp_path / "run", data_root=mnist_root,
                               log=lambda s: None).fit()
    assert metrics["train_oe_profile_margin"] > 0 and 0 <= metrics["train_oe_profile_inside"] <= 1


def test_auroc_agrees_with_counting_pairs():
    a, b = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0.3, 0.9, 0.4])
    pairs = sum(float(y > x) + 0.5 * float(y == x) for x in a for y in b) / (len(a) * len(b))
    assert abs(auroc(a, b) - pairs) < 1e-12


def test_batchnorm_statistics_are_left_alone_on_outliers():
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(1)).train()
    before = bn[0].running_mean.clone()
    with running_batchnorm(bn):
        bn(torch.full((4, 1, 3, 3), 7.0))
    assert torch.equal(bn[0].running_mean, before) and bn.training


def _nearest(model, images):
    model.eval()
    with torch.no_grad():
        return model(images).distances.min(dim=1).values


def test_prototypedl_fine_tune_with_outlier_exposure_moves_held_out_outliers_away(tmp_path, mnist_root):
    base = tiny_config_dict(epochs=2)
    base["data"]["train_subset"] = 1000
    first = PrototypeDLTrainer(Config.from_dict(base), tmp_path / "base", data_root=mnist_root, log=lambda s: None)
    first.fit()
    val_outliers = torch.from_numpy(build_outliers(part="val", per_unit=4).images)
    digits = first.data["val"].images[:300]

    def separation(model) -> float:
        return auroc(_nearest(model, digits), _nearest(model, val_outliers))

    runs = {}
    for name, weight in (("plain", 0.0), ("oe", 1.0)):
        config = tiny_config_dict(epochs=2, lr=0.001, init_from=str(tmp_path / "base" / "last.pt"))
        config["data"]["train_subset"] = 1000
        config["outlier_exposure"] = {**OE, "weight": weight}
        trainer = PrototypeDLTrainer(Config.from_dict(config), tmp_path / name, data_root=mnist_root,
                                     log=lambda s: None)
        runs[name] = (trainer, trainer.fit())
    metrics = runs["oe"][1]
    assert metrics["train_oe_margin_loss"] > 0 and 0 < metrics["val_oe_auroc"] <= 1
    assert "train_oe_margin_loss" not in runs["plain"][1]
    # the same two epochs from the same weights: with the term, outliers from fonts it never saw sit
    # further from the prototypes (their typicality falls) than without it
    assert separation(runs["oe"][0].model) > separation(runs["plain"][0].model) + 0.02


def test_protopnet_training_step_computes_the_term(tmp_path, mnist_root):
    config = tiny_protopnet_dict()
    config["train"]["epochs"] = 1
    config["schedule"].update(warm_epochs=0, push_start=1, last_layer_epochs=1)
    config["outlier_exposure"] = {**OE, "margin_scale": 20.0}  # a random start: most outliers inside it
    trainer = ProtoPNetTrainer(Config.from_dict(config), tmp_path / "run", data_root=mnist_root, log=lambda s: None)
    before = trainer.model.add_on[0].weight.detach().clone() if hasattr(trainer.model.add_on[0], "weight") else None
    metrics = trainer.fit()
    assert metrics["train_oe_margin_loss"] > 0 and 0 <= metrics["train_oe_inside_margin"] <= 1
    assert 0 < metrics["val_oe_auroc"] <= 1 and "val_oe_fpr95" in metrics
    if before is not None:
        assert not torch.equal(before, trainer.model.add_on[0].weight)


def test_outliers_in_the_digits_batch_are_normalised_with_them(tmp_path, mnist_root):
    """batchnorm "batch": one pass over digits and outliers, split back into rows; the batch-norm running
    statistics see both. "running": the outliers' own pass leaves the statistics as the digits set them."""
    config = tiny_protopnet_dict()
    config["outlier_exposure"] = {**OE, "batchnorm": "batch"}
    trainer = ProtoPNetTrainer(Config.from_dict(config), tmp_path / "run", data_root=mnist_root, log=lambda s: None)
    model, oe = trainer.model.train(), trainer.oe
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x, xo = trainer.data["train"].images[:8], oe.batch(0, 0)
    after = {}
    for mode in ("batch", "running"):
        oe.cfg.batchnorm = mode
        bn.reset_running_stats()
        out, out_o = oe.forward_both(model, x, xo)
        assert out.logits.shape[0] == len(x) and out_o.distance_maps.shape[0] == len(xo)
        after[mode] = bn.running_mean.clone()
        if mode == "batch":
            bn.reset_running_stats()
            both = model(torch.cat([x, xo]))
            assert torch.allclose(out_o.distances, both.distances[len(x):])
            assert torch.allclose(out.similarities, both.similarities[:len(x)])
    bn.reset_running_stats()
    model(x)
    assert torch.allclose(after["running"], bn.running_mean)  # the digits' statistics alone
    assert not torch.allclose(after["batch"], bn.running_mean)


def test_config_refuses_an_unknown_batchnorm_mode():
    with pytest.raises(ConfigError, match="outlier_exposure.batchnorm"):
        Config.from_dict({"outlier_exposure": {"weight": 1.0, "batchnorm": "frozen"}})


def _cli(*args, root=None):
    env = {k: v for k, v in os.environ.items() if k != "PROTOSERVE_DATA_ROOT"}
    if root:
        env["PROTOSERVE_DATA_ROOT"] = str(root)
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_config_refuses_a_negative_weight():
    with pytest.raises(ConfigError, match="outlier_exposure.weight"):
        Config.from_dict({"outlier_exposure": {"weight": -1.0}})
    with pytest.raises(ConfigError, match="profile_weight"):
        Config.from_dict({"outlier_exposure": {"weight": 1.0, "profile_weight": -0.5}})


def test_cli_refuses_a_missing_start_checkpoint_in_one_line(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict()))
    missing = _cli("train", "--config", str(config), "--init-from", str(tmp_path / "none.pt"),
                   "--outlier-exposure", "0.5", "--out", str(tmp_path / "b"))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "checkpoint not found" in missing.stderr


def test_resume_with_the_profile_margin_gives_the_same_weights_as_a_straight_run(tmp_path, mnist_root):
    """The profile margin's running means and covariance are training state: a resumed run goes on with them."""
    config = tiny_protopnet_dict(push_start=1, push_every=2)
    config["outlier_exposure"] = {**OE, "profile_weight": 1.0, "batchnorm": "batch"}

    def trainer(out):
        return ProtoPNetTrainer(Config.from_dict(config), tmp_path / out, data_root=mnist_root, log=lambda s: None)

    straight = trainer("straight")
    straight.fit()
    trainer("split").fit(stop_after=2)
    resumed = trainer("split")
    resumed.resume()
    assert resumed.oe.profile.covariance is not None
    resumed.fit()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
