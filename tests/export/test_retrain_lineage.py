"""A retrained version names the version it replaces: lineage mode "retrain" with both test accuracies."""

import pytest

from bundle.runtime import verify_bundle
from export.build import ExportError, export_bundle


def test_a_retrained_bundle_names_its_parent(tmp_path, tiny_checkpoint, tiny_bundle, mnist_root):
    out = tmp_path / "bundle"
    export_bundle(tiny_checkpoint, out, "tiny-prototypedl", "0.2.0", data_root=str(mnist_root), test_images=300,
                  log=lambda s: None, quality=None, parent=tiny_bundle)
    bundle, _ = verify_bundle(out)
    lineage = bundle.manifest.lineage
    assert lineage.mode == "retrain" and lineage.parent == "tiny-prototypedl:0.1.0"
    assert lineage.verdicts == [] and lineage.rounds == 0
    assert lineage.comparison["test_accuracy"]["retrained"] == bundle.manifest.metrics.test_accuracy
    assert lineage.config["epochs"] == 2  # the retrained checkpoint's schedule


def test_a_parent_of_another_family_is_refused(tmp_path, tiny_checkpoint, tiny_protopnet_bundle, mnist_root):
    with pytest.raises(ExportError, match="is a protopnet model, the checkpoint a prototypedl model"):
        export_bundle(tiny_checkpoint, tmp_path / "bundle", "tiny-prototypedl", "0.2.0", data_root=str(mnist_root),
                      test_images=300, log=lambda s: None, quality=None, parent=tiny_protopnet_bundle)
    assert not (tmp_path / "bundle").exists()
