"""Each prototype's nearest training images: computed from the version's checkpoint, shown by the review API."""

from __future__ import annotations

import io

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from revision.neighbours import nearest_training_images, write_neighbours
from service.review import app


def test_nearest_images_are_the_smallest_distances(tiny_checkpoint, mnist_root):
    rows, images = nearest_training_images(tiny_checkpoint, str(mnist_root), k=3, limit=300)
    assert len(rows) == 15 and all(len(r) == 3 for r in rows)  # the tiny PrototypeDL has 15 prototypes
    for found in rows:
        distances = [d for _, _, d in found]
        assert distances == sorted(distances) and len({i for i, _, _ in found}) == 3
        assert all(0 <= i < 300 for i, _, _ in found)
    assert images.shape[0] == 300 and float(images.min()) >= 0 and float(images.max()) <= 1


def test_written_beside_the_version_and_shown_by_the_review_api(two_versions, mnist_root, monkeypatch):
    registry, v1, _ = two_versions
    write_neighbours(registry, v1, str(mnist_root), k=2, limit=200)
    monkeypatch.setenv("PROTOSERVE_REGISTRY", str(registry.root))
    http = TestClient(app)
    row = http.get(f"/api/versions/{v1}/prototypes").json()["prototypes"][4]
    near = row["nearest_training_images"]
    assert len(near) == 2 and near[0]["distance"] <= near[1]["distance"]
    picture = http.get(near[0]["image"].removeprefix("/review"))
    assert picture.status_code == 200
    pixels = np.asarray(Image.open(io.BytesIO(picture.content)))
    assert pixels.shape == (28, 28) and pixels.max() > 0  # an MNIST digit
    assert http.get(f"/api/versions/{v1}/neighbours/../registry.sqlite").status_code == 404
    assert http.get(f"/api/versions/{v1}/neighbours/999_9.png").status_code == 404
    assert http.get("/api/versions/0.2.0/prototypes").json()["prototypes"][0]["nearest_training_images"] == []
