"""Loading a bundle for serving: verified, warmed up, on the provider the session really has."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from export.bundle import BundleError
from service.model import bundle_location, load_model


def test_load_verifies_warms_up_and_runs(tiny_bundle):
    model = load_model(tiny_bundle, device="auto")
    assert model.provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    with np.load(tiny_bundle / "probe.npz") as probe:
        images, expected = probe["input.image"], probe["output.probabilities"]
    probabilities, distances = model.classify(images)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert distances.shape == (len(images), len(model.bundle.manifest.prototypes))
    # The drift reference: quantiles of the probe's nearest distances, in order.
    ref = model.reference_distance
    assert 0 < ref["0.5"] <= ref["0.95"] <= ref["1.0"]
    assert ref["1.0"] == pytest.approx(float(distances.min(axis=1).max()), rel=1e-5)


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
    assert bundle_location().parts[-3:] == ("models", "prototypedl_mnist", "bundle")


def test_bundle_from_the_bentoml_model_store(monkeypatch, tmp_path, tiny_bundle):
    from export.bundle import read_bundle
    from export.store import import_bundle

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
