"""The service as users meet it: a real `bentoml serve` process over real HTTP (httpx and BentoML's client)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import bentoml
import httpx
import numpy as np
import pytest
from PIL import Image

from bundle.manifest import read_bundle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits(tiny_bundle) -> tuple[np.ndarray, np.ndarray]:
    """The probe's test images [10, 1, 28, 28] in [0, 1], and their expected probabilities."""
    with np.load(tiny_bundle / "probe.npz") as probe:
        return probe["input.image"], probe["output.probabilities"]


def png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((pixels[0] * 255).round().astype(np.uint8), mode="L").save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def scrape(url: str) -> dict[str, float]:
    """/metrics as {"name{labels}": value} for protoserve_ series."""
    samples = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("protoserve_"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in samples.items()
               if re.match(rf"{name}(\{{|$)", k) and all(w in k for w in wanted))


def test_health_and_the_provider_in_the_log(server, server_log, tiny_bundle):
    assert httpx.get(f"{server}/livez").status_code == 200
    assert httpx.get(f"{server}/readyz").status_code == 200
    tag = read_bundle(tiny_bundle).manifest.tag
    lines = [line for line in server_log.read_text().splitlines() if f"protoserve: serving {tag}" in line]
    assert len(lines) == 2 and all(line.endswith("on CPUExecutionProvider") for line in lines), lines


def test_predict_png_jpeg_and_arrays_in_order(server, digits, tiny_bundle):
    images, expected = digits
    body = {"images": [b64(png(images[0])), b64(png(images[1], "JPEG")), images[2].tolist(), images[3][0].tolist()]}
    r = httpx.post(f"{server}/predict", json=body, timeout=30)
    assert r.status_code == 200, r.text
    # The request gate answers /predict with the headers BentoML's API layer gives its own answers.
    assert r.headers["server"] == httpx.post(f"{server}/metadata", timeout=30).headers["server"] == \
        "BentoML Service/protoserve"
    answer = r.json()
    manifest = read_bundle(tiny_bundle).manifest
    assert answer["model"] == {"name": manifest.name, "version": manifest.version}
    predictions = answer["predictions"]
    assert len(predictions) == 4
    for p in predictions:
        assert set(p) >= {"label", "class_name", "probabilities"}
        assert p["label"] == int(np.argmax(p["probabilities"])) and p["class_name"] == manifest.class_names[p["label"]]
        assert sum(p["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    # Arrays go through unchanged: the answer is the probe's stored output; PNG loses < 1/255 per pixel.
    np.testing.assert_allclose(predictions[2]["probabilities"], expected[2], atol=1e-5)
    np.testing.assert_allclose(predictions[3]["probabilities"], expected[3], atol=1e-5)
    np.testing.assert_allclose(predictions[0]["probabilities"], expected[0], atol=5e-3)


def test_predict_with_bentoml_client(server, digits):
    images, expected = digits
    with bentoml.SyncHTTPClient(server) as client:
        answer = client.predict(images=[b64(png(images[4]))])
        assert answer["predictions"][0]["label"] == int(np.argmax(expected[4]))
        metadata = client.metadata()
        assert metadata["provider"] == "CPUExecutionProvider"
        explained = client.explain(image=images[5].tolist(), top_k=2)
        assert len(explained["prototypes"]) == 2


def test_multipart_uploads(server, digits):
    images, expected = digits
    files = [("images", (f"{i}.png", png(images[i]), "image/png")) for i in range(3)]
    r = httpx.post(f"{server}/predict", files=files, timeout=30)
    assert r.status_code == 200, r.text
    assert [p["label"] for p in r.json()["predictions"]] == [int(np.argmax(e)) for e in expected[:3]]
    r = httpx.post(f"{server}/explain", files=[("image", ("x.png", png(images[0]), "image/png"))],
                   data={"top_k": "4"}, timeout=30)
    assert r.status_code == 200, r.text
    assert len(r.json()["prototypes"]) == 4


def test_explain(server, digits, tiny_bundle):
    images, _ = digits
    r = httpx.post(f"{server}/explain", json={"image": b64(png(images[6])), "top_k": 3}, timeout=30)
    assert r.status_code == 200, r.text
    answer = r.json()
    manifest = read_bundle(tiny_bundle).manifest
    assert answer["model"]["version"] == manifest.version
    rows = answer["prototypes"]
    assert len(rows) == 3
    assert [row["distance"] for row in rows] == sorted(row["distance"] for row in rows)
    table = {p.id: p for p in manifest.prototypes}
    label = answer["prediction"]["label"]
    for row in rows:
        assert set(row) >= {"id", "class_identity", "distance", "similarity", "weight", "contribution", "image"}
        assert row["class_identity"] == table[row["id"]].class_identity
        assert row["weight"] == pytest.approx(table[row["id"]].weights[label])
        assert row["contribution"] == pytest.approx(row["weight"] * row["distance"], rel=1e-5)
        picture = Image.open(io.BytesIO(base64.b64decode(row["image"])))
        assert picture.format == "PNG"
    reconstruction = Image.open(io.BytesIO(base64.b64decode(answer["reconstruction"])))
    assert reconstruction.size == (28, 28)
    # Default top_k is 3.
    r = httpx.post(f"{server}/explain", json={"image": images[6].tolist()}, timeout=30)
    assert len(r.json()["prototypes"]) == 3


def test_metadata_and_catalogue(server, tiny_bundle):
    manifest = read_bundle(tiny_bundle).manifest
    for method in ("GET", "POST"):
        answer = httpx.request(method, f"{server}/metadata", json={} if method == "POST" else None)
        assert answer.headers["x-model-version"] == manifest.version
        meta = answer.json()
        assert meta["model"] == {"name": manifest.name, "version": manifest.version}
        assert meta["family"] == "prototypedl" and meta["provider"] == "CPUExecutionProvider"
        assert meta["input"]["height"] == 28 and meta["class_names"] == manifest.class_names
    answer = httpx.get(f"{server}/prototypes")
    assert answer.headers["x-model-version"] == manifest.version
    catalogue = answer.json()
    assert catalogue["model"]["name"] == manifest.name
    assert [p["id"] for p in catalogue["prototypes"]] == [p.id for p in manifest.prototypes]
    for row, stored in zip(catalogue["prototypes"], manifest.prototypes, strict=True):
        assert row["class_identity"] == stored.class_identity and row["weights"] == stored.weights
        assert base64.b64decode(row["image"]) == (tiny_bundle / stored.image).read_bytes()


def test_openapi_documents_the_input_conversion(server):
    spec = httpx.get(f"{server}/docs.json").json()
    text = json.dumps(spec)
    assert "/predict" in spec["paths"] and "/explain" in spec["paths"]
    assert "base64 PNG/JPEG" in text and "resized" in text


def bomb_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))


def bad_requests(images: np.ndarray) -> list[tuple[str, str, dict, int, str]]:
    """(id, route, httpx request kwargs, status, reason): every kind of bad input the service refuses."""
    good = png(images[0])
    nan = images[0][0].copy()
    nan[3, 3] = np.nan
    row = ",".join(["0.0"] * 28)
    nan_body = '{"images": [[' + ",".join([f"[{row}]"] * 27 + ["[NaN," + ",".join(["0.0"] * 27) + "]"]) + "]]}"
    inf_body = nan_body.replace("NaN", "Infinity")
    return [
        ("not-an-image", "/predict", {"json": {"images": [b64(b"this is text, not a picture")]}}, 400, "not_an_image"),
        ("truncated-png", "/predict", {"json": {"images": [b64(good[: len(good) // 2])]}}, 400, "corrupt_image"),
        ("corrupt-png", "/predict", {"json": {"images": [b64(good[:30] + b"\xff" * 20 + good[50:])]}}, 400,
         "corrupt_image"),
        ("bomb", "/predict", {"json": {"images": [b64(bomb_header(100_000, 100_000))]}}, 400, "image_too_large"),
        ("huge-dimensions", "/explain", {"json": {"image": b64(bomb_header(20_000, 20))}}, 400, "image_too_large"),
        ("bad-base64", "/predict", {"json": {"images": ["%%% not base64 %%%"]}}, 400, "bad_base64"),
        ("empty-batch", "/predict", {"json": {"images": []}}, 400, "empty_batch"),
        ("oversized-batch", "/predict", {"json": {"images": [images[0].tolist()] * 65}}, 400, "batch_too_large"),
        ("oversized-body", "/predict", {"content": b'{"images": ["' + b"A" * (9 * 1024 * 1024) + b'"]}',
                                        "headers": {"content-type": "application/json"}}, 413, "body_too_large"),
        ("wrong-shape", "/predict", {"json": {"images": [[[0.5] * 27] * 28]}}, 400, "wrong_shape"),
        ("ragged", "/explain", {"json": {"image": [[0.5] * 28] * 27 + [[0.5]]}}, 400, "wrong_shape"),
        ("nan", "/predict", {"content": nan_body, "headers": {"content-type": "application/json"}}, 400,
         "non_finite"),
        ("inf", "/predict", {"content": inf_body, "headers": {"content-type": "application/json"}}, 400,
         "non_finite"),
        ("out-of-range", "/predict", {"json": {"images": [(images[0] * 255).tolist()]}}, 400, "out_of_range"),
        ("images-not-a-list", "/predict", {"json": {"images": "abc"}}, 400, "wrong_type"),
        ("image-a-number", "/explain", {"json": {"image": 7}}, 400, "wrong_type"),
        ("body-a-list", "/predict", {"json": [1, 2, 3]}, 400, "wrong_type"),
        ("top-k-a-string", "/explain", {"json": {"image": images[0].tolist(), "top_k": "3"}}, 400, "wrong_type"),
        ("missing-images", "/predict", {"json": {"pictures": []}}, 400, "missing_field"),
        ("missing-image", "/explain", {"json": {"top_k": 2}}, 400, "missing_field"),
        ("invalid-json", "/predict", {"content": b"{oops", "headers": {"content-type": "application/json"}}, 400,
         "invalid_json"),
        ("top-k-zero", "/explain", {"json": {"image": images[0].tolist(), "top_k": 0}}, 400, "top_k_out_of_range"),
        ("top-k-too-big", "/explain", {"json": {"image": images[0].tolist(), "top_k": 1000}}, 400,
         "top_k_out_of_range"),
        ("text-plain", "/predict", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415,
         "unsupported_media_type"),
    ]


def test_every_bad_input_is_a_counted_4xx_and_the_service_stays_healthy(server, digits):
    images, _ = digits
    cases = bad_requests(images)
    before = scrape(server)
    with httpx.Client(base_url=server, timeout=60) as client:
        for name, route, kwargs, status, reason in cases:
            r = client.post(route, **kwargs)
            assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
            body = r.json()
            assert body["reason"] == reason and isinstance(body["error"], str) and body["error"], name
            assert body["model"]["name"] == "tiny-prototypedl", name
        assert client.get("/readyz").status_code == 200
        assert client.post("/predict", json={"images": [images[0].tolist()]}).status_code == 200
    after = scrape(server)
    for reason in {c[4] for c in cases}:
        expected = sum(1 for c in cases if c[4] == reason)
        got = (total(after, "protoserve_rejected_inputs_total", reason=reason)
               - total(before, "protoserve_rejected_inputs_total", reason=reason))
        assert got == expected, f"{reason}: counted {got}, sent {expected}"


def test_bad_input_through_bentoml_client_names_the_problem(server):
    from bentoml.exceptions import InvalidArgument

    with bentoml.SyncHTTPClient(server) as client, pytest.raises(InvalidArgument) as e:
        client.predict(images=[])
    assert json.loads(str(e.value)) == {"error": '"images" is empty', "reason": "empty_batch",
                                        "model": {"name": "tiny-prototypedl", "version": "0.1.0"}}


def test_streamed_oversized_body_is_413(server):
    def chunks():
        for _ in range(10):
            yield b"A" * (1024 * 1024)

    r = httpx.post(f"{server}/predict", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["reason"] == "body_too_large"


def test_requests_land_on_both_workers_and_metrics_add_up(server, digits):
    images, _ = digits
    before = scrape(server)
    sent_predict, workers = 0, set()

    def call(i: int) -> tuple[str, int]:
        n = 1 + i % 3
        with httpx.Client(timeout=60) as client:  # a new connection each time, so the kernel spreads them
            r = client.post(f"{server}/predict", json={"images": [images[i % 10].tolist()] * n})
        assert r.status_code == 200, r.text
        return r.headers["x-protoserve-worker"], n

    with ThreadPoolExecutor(8) as pool:
        for worker, n in pool.map(call, range(60)):
            workers.add(worker)
            sent_predict += n
    assert len(workers) == 2, f"all requests landed on {workers}"
    after = scrape(server)
    delta = total(after, "protoserve_predictions_total") - total(before, "protoserve_predictions_total")
    assert delta == sent_predict
    count = "protoserve_inference_seconds_count"
    assert total(after, count, api="predict") - total(before, count, api="predict") == 60
    assert (total(after, "protoserve_confidence_count") - total(before, "protoserve_confidence_count")) == sent_predict
    assert (total(after, "protoserve_nearest_prototype_total")
            - total(before, "protoserve_nearest_prototype_total")) == sent_predict
    info = [k for k in after if k.startswith("protoserve_model_info{")]
    assert len(info) == 1 and 'provider="CPUExecutionProvider"' in info[0] and after[info[0]] == 1.0
    assert any(k.startswith("bentoml_service_request_total") for k in httpx.get(f"{server}/metrics").text.split())


def test_a_damaged_bundle_stops_start_up_with_a_clear_message(tiny_bundle, tmp_path, start_service):
    damaged = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, damaged)
    data = bytearray((damaged / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / "model.onnx").write_bytes(bytes(data))
    log = tmp_path / "serve.log"
    with pytest.raises(pytest.fail.Exception) as e, start_service(damaged, tmp_path / "home", log, 90):
        pass
    assert "exited" in str(e.value)
    assert "model.onnx: sha256 does not match the manifest" in log.read_text()


def test_random_garbage_never_gets_a_5xx(server, digits):
    """Random bodies, content types and JSON shapes: every answer is a 2xx or a counted 4xx."""
    images, _ = digits
    rng = np.random.default_rng(7)
    good_png = png(images[0])
    values = [None, True, 3, -1.5, "x", "", [], {}, [[]], [[[]]], [None], ["", ""], {"a": [1]},
              b64(good_png[:40]), b64(bytes(rng.integers(0, 256, 300, dtype=np.uint8))),
              rng.random((28, 29)).tolist(), rng.random((2, 28, 28)).tolist(), [[1e308] * 28] * 28]
    bodies = [(route, {"images": [v]}) for route in ("/predict",) for v in values]
    bodies += [(route, {"images": v}) for route in ("/predict",) for v in values]
    bodies += [("/explain", {"image": v, "top_k": k}) for v in values for k in (None, 1, "1", 2.0, [3])]
    with httpx.Client(base_url=server, timeout=60) as client:
        for route, body in bodies:
            r = client.post(route, json=body)
            assert r.status_code < 500, f"{route} {str(body)[:200]}: {r.status_code} {r.text[:200]}"
            if r.status_code >= 400:
                assert r.json()["reason"] and r.json()["error"]
        for _ in range(30):
            raw = bytes(rng.integers(0, 256, int(rng.integers(0, 2000)), dtype=np.uint8))
            content_type = str(rng.choice(["application/json", "multipart/form-data; boundary=zz", "image/png", ""]))
            r = client.post(str(rng.choice(["/predict", "/explain"])), content=raw,
                            headers={"content-type": content_type} if content_type else {})
            assert 400 <= r.status_code < 500, f"{content_type}: {r.status_code} {r.text[:200]}"
        assert client.get("/readyz").status_code == 200
