"""A retrained version names the version it replaces: lineage mode "retrain" with both test accuracies."""

import pytest
import torch

from bundle.runtime import verify_bundle
from export.build import ExportError, config_changes, export_bundle


def test_a_retrained_bundle_names_its_parent(tmp_path, tiny_checkpoint, tiny_bundle, mnist_root):
    out = tmp_path / "bundle"
    export_bundle(tiny_checkpoint, out, "tiny-prototypedl", "0.2.0", data_root=str(mnist_root), test_images=300,
                  log=lambda s: None, quality=None, parent=tiny_bundle)
    bundle, _ = verify_bundle(out)
    lineage = bundle.manifest.lineage
    assert lineage.mode == "retrain" and lineage.parent == "tiny-prototypedl:0.1.0"
    assert lineage.verdicts == [] and lineage.rounds == 0
    assert lineage.comparison["test_accuracy"]["retrained"] == bundle.manifest.metrics.test_accuracy
    # the config says what the retraining changed (here nothing: the same checkpoint), not settings it never read
    assert lineage.config == {}


def test_a_retrained_bundle_lists_what_its_training_changed(tmp_path, tiny_checkpoint, tiny_bundle, mnist_root):
    payload = torch.load(tiny_checkpoint, weights_only=True)
    seed = payload["config"]["train"]["seed"]
    payload["config"]["train"]["seed"] = seed + 1
    payload["config"]["outlier_exposure"] = {"weight": 0.3}
    torch.save(payload, tmp_path / "retrained.pt")
    out = tmp_path / "bundle"
    export_bundle(tmp_path / "retrained.pt", out, "tiny-prototypedl", "0.2.0", data_root=str(mnist_root),
                  test_images=300, log=lambda s: None, quality=None, parent=tiny_bundle)
    config = verify_bundle(out)[0].manifest.lineage.config
    assert config["train.seed"] == {"parent": seed, "retrained": seed + 1}
    assert config["outlier_exposure.weight"] == {"parent": 0.0, "retrained": 0.3}  # the parent's default, filled in
    assert set(config) == {"train.seed", "outlier_exposure.weight"}


def test_the_lineage_config_names_each_changed_setting():
    parent = {"train": {"seed": 0, "lr": 1e-4, "epochs": 25}, "schedule": {"push_start": 15}}
    retrained = {"train": {"seed": 2, "lr": 1e-4, "epochs": 25}, "schedule": {"push_start": 15},
                 "outlier_exposure": {"weight": 0.3}}
    assert config_changes(parent, retrained) == {
        "train.seed": {"parent": 0, "retrained": 2},
        "outlier_exposure": {"parent": None, "retrained": {"weight": 0.3}}}
    assert config_changes(retrained, parent)["outlier_exposure"] == {"parent": {"weight": 0.3}, "retrained": None}


def test_a_parent_of_another_family_is_refused(tmp_path, tiny_checkpoint, tiny_protopnet_bundle, mnist_root):
    with pytest.raises(ExportError, match="is a protopnet model, the checkpoint a prototypedl model"):
        export_bundle(tiny_checkpoint, tmp_path / "bundle", "tiny-prototypedl", "0.2.0", data_root=str(mnist_root),
                      test_images=300, log=lambda s: None, quality=None, parent=tiny_protopnet_bundle)
    assert not (tmp_path / "bundle").exists()
