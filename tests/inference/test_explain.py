"""Top-k, predictions, contributions and pictures, without a server."""

from __future__ import annotations

import base64
import io
from datetime import UTC, datetime

import numpy as np
import pytest
from PIL import Image

from bundle.manifest import GraphSpec, InputSpec, Manifest, Metrics, ProbeSpec, PrototypeRow, TensorSpec, TrainingInfo
from inference.explain import (
    nearest_distance,
    nearest_prototypes,
    pixels_to_picture,
    png_base64,
    predictions,
    prototype_rows,
    similarity,
)


def manifest(statuses=("active", "active", "masked", "active")) -> Manifest:
    M = len(statuses)
    rows = [PrototypeRow(id=10 + j, class_identity=j % 2, weights=[-1.0 * (j + 1), 0.5 * j], status=s)
            for j, s in enumerate(statuses)]
    graph = GraphSpec(file="model.onnx", opset=17, inputs=[TensorSpec(name="image", shape=["N", 1, 2, 2])],
                      outputs=[TensorSpec(name=n, shape=["N", k]) for n, k in
                               (("logits", 2), ("probabilities", 2), ("distances", M), ("latent", 3),
                                ("reconstruction", 4))])
    return Manifest(name="t", version="1", family="prototypedl", created_at=datetime.now(UTC),
                    class_names=["zero", "one"],
                    input=InputSpec(channels=1, height=2, width=2, mean=[0.0], std=[1.0]), model=graph,
                    decoder=graph, prototypes=rows, metrics=Metrics(), probe=ProbeSpec(images=1, atol=0, rtol=0),
                    training=TrainingInfo(config={}))


def test_nearest_first_skips_masked_and_breaks_ties_by_table_order():
    distances = np.array([3.0, 1.0, 0.1, 1.0])
    active = np.array([True, True, False, True])
    assert nearest_prototypes(distances, 3, active).tolist() == [1, 3, 0]
    assert nearest_prototypes(distances, 1, active).tolist() == [1]
    assert nearest_prototypes(distances, 10, active).tolist() == [1, 3, 0]  # k past the active count


def test_nearest_distance_ignores_masked():
    d = np.array([[3.0, 1.0, 0.1, 2.0], [0.5, 4.0, 0.0, 9.0]])
    np.testing.assert_allclose(nearest_distance(d, np.array([True, True, False, True])), [1.0, 0.5])


def test_predictions_in_order():
    probs = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)
    out = predictions(probs, ["zero", "one"])
    assert [p["label"] for p in out] == [0, 1] and [p["class_name"] for p in out] == ["zero", "one"]
    assert out[1]["probabilities"] == [float(np.float32(0.2)), float(np.float32(0.8))]


def test_prototype_rows_weight_and_contribution():
    m = manifest()
    d = np.array([3.0, 1.0, 0.1, 2.0])
    rows = prototype_rows(m, d, np.array([1, 3]), label=0)
    assert [r["id"] for r in rows] == [11, 13]
    assert rows[0]["weight"] == -2.0 and rows[0]["contribution"] == -2.0 * 1.0
    assert rows[1]["class_identity"] == 1 and rows[1]["class_name"] == "one"
    assert rows[0]["similarity"] > rows[1]["similarity"]  # nearer is more similar
    assert similarity(np.float64(0.0)) > similarity(np.float64(1.0)) > 0


def test_png_round_trip():
    pixels = np.linspace(0, 1, 12, dtype=np.float32).reshape(1, 3, 4)
    img = Image.open(io.BytesIO(base64.b64decode(png_base64(pixels_to_picture(pixels)))))
    assert img.format == "PNG" and img.mode == "L" and img.size == (4, 3)
    np.testing.assert_allclose(np.asarray(img) / 255.0, pixels[0], atol=1 / 255)
    rgb = pixels_to_picture(np.stack([pixels[0]] * 3))
    assert rgb.mode == "RGB"


def test_heatmap_is_brightest_where_the_prototype_was_found():
    from inference.explain import heatmap_picture

    similarity_map = np.zeros((7, 7), dtype=np.float32)
    similarity_map[1, 5] = 3.0
    img = heatmap_picture(similarity_map, 28, 28)
    assert img.size == (28, 28) and img.mode == "L"
    pixels = np.asarray(img)
    y, x = np.unravel_index(pixels.argmax(), pixels.shape)
    assert 4 <= y <= 8 and 20 <= x <= 24  # cell (1, 5) of a 7x7 grid over 28x28 pixels
    assert pixels.max() == 255 and pixels.min() == 0
    assert (pixels > 128).sum() > 4  # upsampling spreads the peak over several pixels
    assert np.asarray(heatmap_picture(np.ones((7, 7)), 28, 28)).max() == 0  # a flat map shows nothing


@pytest.mark.parametrize("size", [(7, 7, 28, 28), (7, 5, 224, 160), (3, 3, 3, 3), (1, 1, 28, 28)])
def test_upsampling_is_torchs_bicubic_as_the_push_pictures_use(size):
    import torch

    from inference.explain import upsample
    from training.push import upsample as push_upsample

    h, w, height, width = size
    rng = np.random.default_rng(h * 100 + height)
    similarity_map = rng.random((h, w)).astype(np.float32) * 5
    want = torch.nn.functional.interpolate(torch.from_numpy(similarity_map)[None, None], size=(height, width),
                                           mode="bicubic", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(upsample(similarity_map, height, width), want, rtol=1e-5, atol=1e-5)
    if height == width:
        np.testing.assert_allclose(upsample(similarity_map, height, width),
                                   push_upsample(torch.from_numpy(similarity_map), height), rtol=1e-5, atol=1e-5)


def test_service_heatmap_is_the_push_pictures_activation_overlay():
    import torch

    from inference.explain import heatmap_overlay
    from protoserve.colours import overlay_heat
    from training.push import upsample

    rng = np.random.default_rng(3)
    similarity_map = rng.random((7, 7)).astype(np.float32)
    pixels = rng.random((1, 28, 28))
    rgb = np.asarray(pixels_to_picture(pixels).convert("RGB"), dtype=np.float64)
    want = overlay_heat(rgb, upsample(torch.from_numpy(similarity_map), 28))  # the push pictures' overlay
    got = np.asarray(heatmap_overlay(similarity_map, pixels))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # float32 vs float64 rounding
