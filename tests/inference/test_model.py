"""Loading a bundle for serving: verified, warmed up, on the provider the session really has."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from bundle.manifest import BundleError
from inference.model import bundle_location, load_model


def test_load_verifies_warms_up_and_runs(tiny_bundle):
    model = load_model(tiny_bundle, device="auto")
    assert model.provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    with np.load(tiny_bundle / "probe.npz") as probe:
        images, expected = probe["input.image"], probe["output.probabilities"]
    probabilities, distances = model.classify(images)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert distances.shape == (len(images), len(model.bundle.manifest.prototypes))
    # The drift reference: the manifest's quantiles of the test images' nearest distances, in order.
    ref = model.reference_distance
    assert ref == model.bundle.manifest.metrics.nearest_distance_quantiles
    assert 0 < ref["0.5"] <= ref["0.95"] <= ref["1.0"]


def test_classify_runs_the_graph_cut_to_what_it_reads(tiny_bundle):
    """PrototypeDL's decoder is not run by classify: its session has no reconstruction output, and the
    numbers are those of the whole graph."""
    model = load_model(tiny_bundle, device="cpu")
    assert model.classifier is not None
    names = [o.name for o in model.classifier.get_outputs()]
    assert "reconstruction" in model.bundle.output_names and "reconstruction" not in names
    with np.load(tiny_bundle / "probe.npz") as probe:
        images = probe["input.image"].astype(np.float32)
    whole = model.outputs(images)
    for name, value in zip(("probabilities", "distances"), model.classify(images), strict=True):
        np.testing.assert_array_equal(value, whole[name])


def test_the_drift_reference_is_the_test_sets_nearest_distances(tiny_bundle, mnist_root):
    from scoring.rows import grey_levels_to_input
    from training.mnist import load_split

    model = load_model(tiny_bundle, device="cpu")
    n = model.bundle.manifest.metrics.test_images
    images, _ = load_split(mnist_root, "mnist", "test")
    _, distances = model.classify(grey_levels_to_input(images[:n, None], model.bundle.manifest.input))
    nearest = distances.min(axis=1)
    for q, value in model.reference_distance.items():
        assert value == pytest.approx(float(np.quantile(nearest, float(q))), rel=1e-4)


def test_a_bundle_without_test_set_quantiles_falls_back_to_its_probe(tiny_bundle, tmp_path):
    from bundle.manifest import read_bundle, write_manifest

    old = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, old)
    manifest = read_bundle(old).manifest
    write_manifest(old, manifest.model_copy(update={"metrics": manifest.metrics.model_copy(
        update={"nearest_distance_quantiles": None})}))
    model = load_model(old, device="cpu")
    with np.load(old / "probe.npz") as probe:
        _, distances = model.classify(probe["input.image"])
    assert model.reference_distance["1.0"] == pytest.approx(float(distances.min(axis=1).max()), rel=1e-5)


def test_a_damaged_bundle_does_not_load(tiny_bundle, tmp_path):
    damaged = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, damaged)
    (damaged / "decoder.onnx").write_bytes(b"not onnx")
    with pytest.raises(BundleError, match="decoder.onnx: sha256 does not match"):
        load_model(damaged, device="cpu")


def test_bundle_location_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("PROTOSERVE_MODEL_TAG", raising=False)
    monkeypatch.setenv("PROTOSERVE_BUNDLE", str(tmp_path))
    assert bundle_location() == tmp_path
    monkeypatch.delenv("PROTOSERVE_BUNDLE")
    assert bundle_location().parts[-3:] == ("models", "prototypedl_mnist_headline", "bundle")


def test_bundle_from_the_bentoml_model_store(monkeypatch, tmp_path, tiny_bundle):
    from bundle.manifest import read_bundle
    from bundle.store import import_bundle

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PROTOSERVE_BUNDLE", raising=False)
    stored = import_bundle(tiny_bundle)
    monkeypatch.setenv("PROTOSERVE_MODEL_TAG", stored.tag)
    location = bundle_location()
    assert location.is_relative_to(tmp_path / "home")
    assert read_bundle(location).manifest.tag == stored.tag
    monkeypatch.setenv("PROTOSERVE_MODEL_TAG", "no-such-model:1")
    with pytest.raises(Exception, match="no-such-model:1: not in the BentoML model store"):
        bundle_location()
