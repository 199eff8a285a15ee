"""The `folder` data set end to end on a generated colour data set (3 classes of 32x32 RGB shapes):
train each family a few steps, export a bundle, and explain a picture, in process and over HTTP."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from folder_data import SHAPES, shape_picture, write_shapes

from bundle.manifest import read_bundle

MODEL = {"in_channels": 3, "input_size": 32, "n_classes": 3, "n_prototypes": 6}
TRAIN = {"batch_size": 30, "eval_batch_size": 60, "elastic": False, "seed": 0, "checkpoint_every": 1,
         "num_threads": 1, "lr": 0.002}
CONFIGS = {
    "prototypedl": {"model": {**MODEL, "widths": [16, 16, 16], "latent_maps": 8}, "train": {**TRAIN, "epochs": 2}},
    "protopnet": {"model": {**MODEL, "family": "protopnet", "backbone": "small_cnn", "prototype_dim": 8},
                  "train": {**TRAIN, "epochs": 2},
                  "schedule": {"warm_epochs": 1, "push_start": 2, "push_every": 1, "last_layer_epochs": 1,
                               "lr_features": 1e-3}},
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("shapes"), per_class=20)


@pytest.fixture(scope="module", params=list(CONFIGS))
def folder_bundle(request, shapes, tmp_path_factory):
    """(family, bundle path) of a model trained two epochs on `shapes` and exported."""
    from export.build import export_bundle
    from export.quality.report import QualityOptions
    from training.config import Config
    from training.families import family

    name = request.param
    raw = {"data": {"dataset": "folder", "val_size": 6, "split_seed": 0}, **CONFIGS[name]}
    config = Config.from_dict(raw, source="test")
    run = tmp_path_factory.mktemp(f"folder_{name}")
    family(name).trainer(config, run, data_root=shapes, log=lambda s: None).fit()
    out = run / "bundle"
    export_bundle(run / "best.pt", out, f"shapes-{name}", "0.1.0", data_root=str(shapes), log=lambda s: None,
                  quality=QualityOptions(sample=6, curve_images=4, steps=4, encodings=60))
    return name, out


def _png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_folder_bundle_describes_its_colour_input_and_classes(folder_bundle):
    from inference.model import load_model
    from inference.preprocess import to_input

    family, path = folder_bundle
    manifest = read_bundle(path).manifest
    assert manifest.family == family and manifest.class_names == list(SHAPES)
    spec = manifest.input
    assert (spec.channels, spec.height, spec.width) == (3, 32, 32)
    assert spec.mean == [0.0] * 3 and spec.std == [1.0] * 3 and spec.canonical is None
    model = load_model(path, device="cpu")  # checksums and the golden probe
    picture = shape_picture("square", np.random.default_rng(7))
    x = to_input(_png(picture), spec)[None]
    probabilities, distances = model.classify(x)[:2]
    assert probabilities.shape == (1, 3) and distances.shape == (1, 6)
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-5)


def test_a_folder_bundle_is_served_and_explains_a_picture(folder_bundle, start_service, tmp_path):
    family, path = folder_bundle
    home = tmp_path / "bentoml_home"
    picture = _png(shape_picture("circle", np.random.default_rng(3)))
    with start_service(path, home, tmp_path / "serve.log", PROTOSERVE_WORKERS="1") as url:
        r = httpx.post(f"{url}/explain", json={"image": picture, "top_k": 3}, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["model"] == {"name": f"shapes-{family}", "version": "0.1.0"}
    assert answer["prediction"]["class_name"] in SHAPES and len(answer["prototypes"]) == 3
    rows = answer["prototypes"]
    assert [row["distance"] for row in rows] == sorted(row["distance"] for row in rows)
    if family == "prototypedl":
        assert "reconstruction" in answer
    else:
        assert all("heatmap" in row for row in rows)
