"""Checkpoint -> bundle: the graphs, the prototype table, the "prototype layer intact" proof, parity."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from bundle.manifest import read_bundle
from bundle.parity import DISTANCE, FEATURE, OTHER, PROBABILITY
from bundle.runtime import open_session
from export.build import ParityError, export_bundle, run_onnx, run_torch
from export.onnx_export import PROTOTYPE_INITIALIZER, prototype_vectors, replace_initializer
from export.parity import parity_failures, parity_figures
from training.checkpoint import load_checkpoint
from training.mnist import load_mnist
from training.prototypedl import class_identities

OUTPUTS = ["logits", "probabilities", "distances", "latent", "reconstruction"]


@pytest.fixture(scope="module")
def test_images(mnist_root) -> torch.Tensor:
    return load_mnist(mnist_root)["test"].images


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)[0]


def test_manifest_describes_the_model(tiny_bundle, tiny_checkpoint, model):
    m = read_bundle(tiny_bundle).manifest
    _, config, payload = load_checkpoint(tiny_checkpoint)
    assert (m.family, m.class_names) == ("prototypedl", [str(d) for d in range(10)])
    assert (m.input.channels, m.input.height, m.input.width, m.input.value_range) == (1, 28, 28, (0.0, 1.0))
    assert [t.name for t in m.model.outputs] == OUTPUTS
    assert {t.name: t.shape for t in m.model.outputs}["distances"] == ["N", 15]
    assert m.model.opset >= 17 and m.decoder.file == "decoder.onnx"
    W = model.last_layer.weight.detach()
    assert [p.class_identity for p in m.prototypes] == class_identities(W)
    assert [p.id for p in m.prototypes] == list(range(15))
    np.testing.assert_array_equal(np.array([p.weights for p in m.prototypes], dtype=np.float32), W.T.numpy())
    assert all(p.status == "active" for p in m.prototypes)
    assert m.training.config == payload["config"] and m.training.epoch == payload["epoch"]
    assert m.training.source_commit and len(m.training.source_commit) == 40
    assert 0.0 < m.metrics.test_accuracy <= 1.0 and m.metrics.test_images == 1000


def test_graphs_have_the_contract_names_weights_inside_and_dynamic_batch(tiny_bundle, model, test_images):
    bundle = read_bundle(tiny_bundle)
    proto = onnx.load(str(bundle.model_path))
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == OUTPUTS
    assert all(i.data_location != onnx.TensorProto.EXTERNAL for i in proto.graph.initializer)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    session, _ = open_session(bundle.model_path, "cpu")
    decoder, _ = open_session(bundle.decoder_path, "cpu")
    for n in (1, 7, 64):
        out = dict(zip(OUTPUTS, session.run(None, {"image": test_images[:n].numpy()}), strict=True))
        assert {k: v.shape for k, v in out.items()} == {
            "logits": (n, 10), "probabilities": (n, 10), "distances": (n, 15), "latent": (n, 40),
            "reconstruction": (n, 1, 28, 28)}
        np.testing.assert_allclose(out["probabilities"].sum(1), 1.0, atol=1e-6)
        (decoded,) = decoder.run(None, {"latent": out["latent"]})
        np.testing.assert_allclose(decoded, out["reconstruction"], atol=1e-6)


def test_prototype_pictures_are_the_decoded_prototypes(tiny_bundle, model):
    bundle = read_bundle(tiny_bundle)
    decoder, _ = open_session(bundle.decoder_path, "cpu")
    P = prototype_vectors(bundle.model_path)
    (decoded,) = decoder.run(None, {"latent": P})
    for row in bundle.manifest.prototypes:
        picture = np.asarray(Image.open(bundle.file(row.image)), dtype=np.float32) / 255
        assert picture.shape == (28, 28)
        assert np.abs(picture - decoded[row.id, 0]).max() <= 0.5 / 255 + 1e-6


def test_prototype_layer_is_intact(tiny_bundle, model, test_images, tmp_path):
    """The prototypes are an initializer of model.onnx, and overwriting it moves `distances` and the
    prediction exactly as the same change moves them in PyTorch."""
    bundle = read_bundle(tiny_bundle)
    assert bundle.manifest.model.prototype_initializer == PROTOTYPE_INITIALIZER
    P = prototype_vectors(bundle.model_path).copy()
    np.testing.assert_array_equal(P, model.prototypes.detach().numpy())

    images = test_images[:300]
    before = run_torch(model, images)
    with torch.no_grad():
        z0 = model.encode(images[:1])[0].numpy()
    new_P = np.random.default_rng(0).random(P.shape, dtype=np.float32)
    new_P[5] = z0  # prototype 5 now sits exactly on image 0's latent
    edited = tmp_path / "edited.onnx"
    replace_initializer(bundle.model_path, edited, PROTOTYPE_INITIALIZER, new_P)

    session, _ = open_session(edited, "cpu")
    onnx_after = run_onnx(session, images.numpy())
    with torch.no_grad():
        model.prototypes.copy_(torch.from_numpy(new_P))
    try:
        torch_after = run_torch(model, images)
    finally:
        with torch.no_grad():
            model.prototypes.copy_(torch.from_numpy(P))

    assert onnx_after["distances"][0, 5] < 1e-6
    moved = np.abs(onnx_after["distances"] - before["distances"]) / before["distances"]
    assert np.median(moved) > 0.05
    changed = onnx_after["probabilities"].argmax(1) != before["probabilities"].argmax(1)
    assert changed.sum() > 0
    # The same change in PyTorch gives the same outputs (distance 5 of image 0 is ~0 in both, so it
    # is compared with an absolute floor rather than relatively).
    np.testing.assert_allclose(onnx_after["distances"], torch_after["distances"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(onnx_after["probabilities"], torch_after["probabilities"], atol=1e-5)
    np.testing.assert_array_equal(onnx_after["probabilities"].argmax(1), torch_after["probabilities"].argmax(1))
    np.testing.assert_allclose(onnx_after["latent"], before["latent"], atol=1e-6)  # the encoder is untouched


def test_parity_on_a_test_slice(tiny_bundle, model, test_images):
    images = test_images[:1000]
    session, _ = open_session(read_bundle(tiny_bundle).model_path, "cpu")
    figures = parity_figures(run_torch(model, images), run_onnx(session, images.numpy()))
    assert figures.images == 1000
    assert parity_failures(figures) == []
    stored = read_bundle(tiny_bundle).manifest.metrics.parity
    assert stored.images == 1000 and stored.max_abs_probability_diff == figures.max_abs_probability_diff
    assert stored.limits == {"probabilities": PROBABILITY, "distances": DISTANCE, "latent": FEATURE}
    assert all(0 <= used <= 1 for used in stored.limit_used.values())


def test_the_golden_probe_is_held_to_the_same_limits(tiny_bundle):
    probe = read_bundle(tiny_bundle).manifest.probe
    assert probe.limits == {"probabilities": PROBABILITY, "distances": DISTANCE, "latent": FEATURE}
    assert (probe.atol, probe.rtol) == (OTHER.atol, OTHER.rtol)  # logits, reconstructions


def test_parity_gate_finds_each_kind_of_miss(model, test_images):
    images = test_images[:200]
    ref = run_torch(model, images)
    assert parity_failures(parity_figures(ref, ref)) == []

    shifted = dict(ref, probabilities=ref["probabilities"] + 2e-5)
    assert "probabilities differ" in parity_failures(parity_figures(ref, shifted))[0]
    scaled = dict(ref, distances=ref["distances"] * (1 + 2e-4))
    assert "distances differ" in " ".join(parity_failures(parity_figures(ref, scaled)))

    order = np.argsort(ref["distances"][0])
    swapped = ref["distances"].copy()
    swapped[0, order[0]], swapped[0, order[1]] = ref["distances"][0, order[1]], ref["distances"][0, order[0]]
    figures = parity_figures(ref, dict(ref, distances=swapped))
    assert figures.top3_mismatches == 1

    low, high = sorted(order[:2])  # the stable sort ranks `low` first on a tie
    tied_ref = ref["distances"].copy()
    tied_ref[0, high] = tied_ref[0, low] = ref["distances"][0, order[0]]  # an exact tie between the two nearest
    tied_other = tied_ref.copy()
    tied_other[0, low] = np.nextafter(tied_ref[0, low], np.float32(np.inf))  # ... that the other side breaks
    figures = parity_figures(dict(ref, distances=tied_ref), dict(ref, distances=tied_other))
    assert (figures.top3_mismatches, figures.top3_ties) == (0, 1)

    flipped = ref["probabilities"].copy()
    flipped[0] = flipped[0][::-1]
    assert parity_figures(ref, dict(ref, probabilities=flipped)).argmax_mismatches == 1


def test_parity_excuses_a_near_zero_distance_but_not_a_real_difference(model, test_images):
    """A prototype on an input's latent: 1.15e-10 apart is 2.5e-4 relative, and the same answer."""
    ref = run_torch(model, test_images[:200])
    nearest = ref["distances"][0].argmin()
    near_ref, near = ref["distances"].copy(), ref["distances"].copy()
    near_ref[0, nearest], near[0, nearest] = np.float32(4.59154e-07), np.float32(4.59269e-07)
    figures = parity_figures(dict(ref, distances=near_ref), dict(ref, distances=near))
    assert figures.max_rel_distance_diff > 2e-4 and parity_failures(figures) == []
    near[0, nearest] = np.float32(1e-4)  # the prototype moved off the patch
    assert "distances differ" in " ".join(parity_failures(parity_figures(dict(ref, distances=near_ref),
                                                                         dict(ref, distances=near))))


def test_export_refuses_a_bundle_that_misses_parity(tiny_checkpoint, mnist_root, tmp_path, monkeypatch):
    """A graph whose prototypes drifted from the checkpoint's must not become a bundle."""
    import export.build

    real_export_graph = export.build.export_graph

    def drifted_export_graph(module, spec, path):
        real_export_graph(module, spec, path)
        if spec.prototype_initializer:
            replace_initializer(path, path, spec.prototype_initializer,
                                prototype_vectors(path, spec.prototype_initializer) * 1.001)

    monkeypatch.setattr(export.build, "export_graph", drifted_export_graph)
    out = tmp_path / "bundle"
    with pytest.raises(ParityError, match="parity with PyTorch fails: .*distances differ"):
        export_bundle(tiny_checkpoint, out, "tiny", "0.0.1", data_root=str(mnist_root), test_images=200,
                      log=lambda s: None)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_refuses_to_overwrite_a_bundle(tiny_bundle, tiny_checkpoint, mnist_root):
    from export.build import ExportError

    with pytest.raises(ExportError, match="bundles are immutable"):
        export_bundle(tiny_checkpoint, tiny_bundle, "tiny-prototypedl", "0.1.0", data_root=str(mnist_root))


@pytest.mark.slow
def test_parity_on_the_whole_test_set(tiny_checkpoint, mnist_root, tmp_path):
    """Issue 3's parity limits on all 10,000 MNIST test images, through `protoserve export` itself."""
    result = export_bundle(tiny_checkpoint, tmp_path / "bundle", "tiny-prototypedl", "0.1.0",
                           data_root=str(mnist_root), log=lambda s: None)
    figures = result.parity
    assert figures.images == 10000
    assert figures.max_abs_probability_diff <= 1e-5 and figures.max_rel_distance_diff <= 1e-4
    assert figures.argmax_mismatches == 0 and figures.top3_mismatches == 0
    assert read_bundle(tmp_path / "bundle").manifest.metrics.test_images == 10000
