"""/explain for a ProtoPNet bundle over real HTTP, and the heatmap overlay without a server."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from bundle.manifest import read_bundle
from inference.explain import heatmap_overlay, similarity


def picture(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return img


def test_heatmap_overlay_is_reddest_where_the_prototype_was_found():
    similarity_map = np.zeros((7, 7), dtype=np.float32)
    similarity_map[1, 5] = 3.0
    pixels = np.zeros((1, 28, 28), dtype=np.float32)
    img = heatmap_overlay(similarity_map, pixels)
    assert img.size == (28, 28) and img.mode == "RGB"
    rgb = np.asarray(img, dtype=np.int32)
    warm = rgb[..., 0] - rgb[..., 2]  # red minus blue
    y, x = np.unravel_index(warm.argmax(), warm.shape)
    assert abs(y - (1 * 4 + 2)) <= 2 and abs(x - (5 * 4 + 2)) <= 2
    assert warm[27, 0] < 0  # far away: the cold end of the ramp


@pytest.fixture(scope="module")
def protopnet_server(start_service, tiny_protopnet_bundle, tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml_home_protopnet")
    with start_service(tiny_protopnet_bundle, home, home / "serve.log", PROTOSERVE_WORKERS="1") as url:
        yield url


@pytest.mark.slow
def test_explain_a_protopnet_bundle_over_http(protopnet_server, tiny_protopnet_bundle, mnist_root):
    from training.mnist import load_mnist

    test = load_mnist(mnist_root)["test"]
    image = test.images[0, 0].numpy()
    manifest = read_bundle(tiny_protopnet_bundle).manifest
    r = httpx.post(f"{protopnet_server}/explain", json={"image": image.tolist(), "top_k": 4}, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model"] == {"name": "tiny-protopnet", "version": "0.1.0"}
    rows, label = answer["prototypes"], answer["prediction"]["label"]
    assert len(rows) == 4 and "reconstruction" not in answer
    assert [row["distance"] for row in rows] == sorted(row["distance"] for row in rows)
    table = {p.id: p for p in manifest.prototypes}
    for row in rows:
        assert row["class_identity"] == table[row["id"]].class_identity
        assert row["similarity"] == pytest.approx(float(similarity(np.float64(row["distance"]))), rel=1e-6)
        assert row["contribution"] == pytest.approx(table[row["id"]].weights[label] * row["similarity"], rel=1e-5)
        patch, source, heatmap = picture(row["image"]), picture(row["source_image"]), picture(row["heatmap"])
        assert patch.size[0] >= 11 and source.size == (112, 112)
        assert heatmap.size == (28, 28) and heatmap.mode == "RGB"
    # /predict agrees with /explain, and batch answers keep the order.
    r = httpx.post(f"{protopnet_server}/predict", json={"images": [image.tolist(), test.images[1, 0].tolist()]},
                   timeout=60)
    predictions = r.json()["predictions"]
    assert predictions[0]["label"] == label and len(predictions) == 2
    meta = httpx.get(f"{protopnet_server}/metadata", timeout=30).json()
    assert meta["family"] == "protopnet"
