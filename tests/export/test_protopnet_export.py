"""ProtoPNet checkpoint -> bundle: the same format, `similarity_maps` and `pooled_latent` added, dynamic batch,
parity, provenance."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from bundle.manifest import MANIFEST_FILE, Manifest, read_bundle, write_manifest
from bundle.runtime import open_session, verify_bundle
from export.build import ParityError, export_bundle, run_onnx, run_torch
from export.onnx_export import (
    PROTOTYPE_INITIALIZER,
    classifier_graph,
    classifier_spec,
    export_graph,
    prototype_vectors,
    replace_initializer,
)
from export.parity import parity_failures, parity_figures
from training.checkpoint import load_checkpoint
from training.mnist import load_mnist

OUTPUTS = ["logits", "probabilities", "distances", "similarity_maps", "pooled_latent"]


@pytest.fixture(scope="module")
def test_images(mnist_root) -> torch.Tensor:
    return load_mnist(mnist_root)["test"].images


@pytest.fixture(scope="module")
def model(tiny_protopnet_checkpoint):
    return load_checkpoint(tiny_protopnet_checkpoint)[0]


def test_manifest_table_and_pictures(tiny_protopnet_bundle, model):
    bundle = read_bundle(tiny_protopnet_bundle)
    m = bundle.manifest
    assert m.family == "protopnet" and m.decoder is None and bundle.decoder_path is None
    assert [t.name for t in m.model.outputs] == OUTPUTS
    assert {t.name: t.shape for t in m.model.outputs}["similarity_maps"] == ["N", 20, 7, 7]
    W = model.last_layer.weight.detach()
    np.testing.assert_array_equal(np.array([p.weights for p in m.prototypes], dtype=np.float32), W.T.numpy())
    assert [p.class_identity for p in m.prototypes] == [j // 2 for j in range(20)]
    for row in m.prototypes:
        prov = row.provenance
        assert prov["source_label"] == row.class_identity  # pushed onto its own class
        assert (prov["source_index"], prov["patch"]["row"], prov["patch"]["col"]) == \
            tuple(model.push_source[row.id].tolist())
        assert tuple(prov["receptive_field_box"].values()) == model.rf.box(prov["patch"]["row"], prov["patch"]["col"])
        patch = Image.open(bundle.file(row.image))
        box = prov["receptive_field_box"]
        assert patch.size[0] % (box["x1"] - box["x0"]) == 0  # the patch, enlarged by a whole factor
        for key in ("source_image", "activation_image"):
            assert Image.open(bundle.file(prov[key])).size == (112, 112)


def test_graph_keeps_the_batch_axis_dynamic_and_the_pool_kernel_fixed(tiny_protopnet_bundle, test_images):
    bundle = read_bundle(tiny_protopnet_bundle)
    proto = onnx.load(str(bundle.model_path))
    assert [o.name for o in proto.graph.output] == OUTPUTS
    pools = [n for n in proto.graph.node if n.op_type == "MaxPool"]
    kernels = [list(a.ints) for n in pools for a in n.attribute if a.name == "kernel_shape"]
    assert [7, 7] in kernels  # the minimum over positions: a max-pool of fixed kernel
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    session, _ = open_session(bundle.model_path, "cpu")
    for n in (1, 7, 64):
        out = dict(zip(OUTPUTS, session.run(None, {"image": test_images[:n].numpy()}), strict=True))
        assert {k: v.shape for k, v in out.items()} == {"logits": (n, 10), "probabilities": (n, 10),
                                                        "distances": (n, 20), "similarity_maps": (n, 20, 7, 7),
                                                        "pooled_latent": (n, 16)}
        d = out["distances"]
        np.testing.assert_allclose(out["similarity_maps"].max(axis=(2, 3)), np.log((d + 1) / (d + 1e-4)), rtol=1e-5)


def test_parity_with_the_training_model_and_the_golden_probe(tiny_protopnet_bundle, model, test_images):
    bundle = read_bundle(tiny_protopnet_bundle)
    images = test_images[:1000]
    session, _ = open_session(bundle.model_path, "cpu")
    onnx_out = run_onnx(session, images.numpy())
    figures = parity_figures(run_torch(model, images), onnx_out)
    assert parity_failures(figures) == []
    assert figures.max_rel_feature_diff <= figures.feature_rtol  # pooled_latent, the out-of-domain features
    assert bundle.manifest.metrics.parity.images == 1000
    assert bundle.manifest.metrics.parity.max_rel_feature_diff is not None
    # The graph computes the distances by subtraction; the training model by expanding the square.
    with torch.no_grad():
        trained = model(images[:200])
        pooled = model.latent(images[:200]).mean(dim=(2, 3)).numpy()  # z averaged over positions
    np.testing.assert_allclose(onnx_out["distances"][:200], trained.distances.numpy(), rtol=1e-2, atol=1e-5)
    np.testing.assert_allclose(onnx_out["pooled_latent"][:200], pooled, rtol=1e-4, atol=1e-6)
    assert (onnx_out["probabilities"][:200].argmax(1) == trained.logits.argmax(1).numpy()).mean() >= 0.99
    verify_bundle(tiny_protopnet_bundle)


def test_prototype_layer_is_intact(tiny_protopnet_bundle, model, test_images, tmp_path):
    """Prototypes are the initializer model.prototypes [M, D, 1, 1]; moving one onto an input's patch
    makes that input's distance to it zero in the graph."""
    bundle = read_bundle(tiny_protopnet_bundle)
    P = prototype_vectors(bundle.model_path, PROTOTYPE_INITIALIZER).copy()
    np.testing.assert_array_equal(P, model.prototypes.detach().numpy())
    with torch.no_grad():
        z = model.latent(test_images[:1])[0]  # [D, 7, 7]
    P[3, :, 0, 0] = z[:, 2, 5].numpy()
    edited = tmp_path / "edited.onnx"
    replace_initializer(bundle.model_path, edited, PROTOTYPE_INITIALIZER, P)
    session, _ = open_session(edited, "cpu")
    distances, maps = session.run(["distances", "similarity_maps"], {"image": test_images[:1].numpy()})
    assert distances[0, 3] < 1e-6
    assert np.unravel_index(maps[0, 3].argmax(), (7, 7)) == (2, 5)


def test_a_prototype_on_an_inputs_patch_keeps_parity(model, test_images, tmp_path):
    """The 2-round revision's case: a prototype sitting on a test image's latent patch (distance ~0),
    where the runtimes differ by far less than float32 resolves at the latent's scale."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.prototypes[3, :, 0, 0] = moved.latent(test_images[:1])[0, :, 2, 5] + 1e-4
    spec = classifier_spec(moved)
    export_graph(classifier_graph(moved), spec, tmp_path / spec.file)
    session, _ = open_session(tmp_path / spec.file, "cpu")
    images = test_images[:200]
    torch_out, onnx_out = run_torch(moved, images), run_onnx(session, images.numpy())
    assert torch_out["distances"][0, 3] < 1e-5
    assert parity_failures(parity_figures(torch_out, onnx_out)) == []


def perturbed(path, spec):
    """The graph's prototypes moved by 1e-3 per channel: a wrong graph, every output still plausible."""
    name = spec.prototype_initializer
    replace_initializer(path, path, name, prototype_vectors(path, name) + 1e-3)


def test_export_refuses_a_graph_with_perturbed_prototypes(tiny_protopnet_checkpoint, mnist_root, tmp_path,
                                                          monkeypatch):
    import export.build

    real_export_graph = export.build.export_graph

    def drifted_export_graph(module, spec, path):
        real_export_graph(module, spec, path)
        perturbed(path, spec)

    monkeypatch.setattr(export.build, "export_graph", drifted_export_graph)
    out = tmp_path / "bundle"
    with pytest.raises(ParityError, match="parity with PyTorch fails: .*distances differ"):
        export_bundle(tiny_protopnet_checkpoint, out, "tiny", "0.0.1", data_root=str(mnist_root), test_images=200,
                      log=lambda s: None)
    assert not out.exists()


def test_verify_refuses_a_resigned_graph_with_perturbed_prototypes(tiny_protopnet_bundle, tmp_path):
    copied = Path(shutil.copytree(tiny_protopnet_bundle, tmp_path / "bundle"))
    perturbed(copied / "model.onnx", read_bundle(copied).manifest.model)
    write_manifest(copied, Manifest.model_validate_json((copied / MANIFEST_FILE).read_text()))  # re-signed
    read_bundle(copied)
    result = subprocess.run([sys.executable, "-m", "cli.main", "verify", str(copied)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert f"{copied / 'model.onnx'}: golden probe failed" in result.stderr
