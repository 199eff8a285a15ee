"""The Open Inference Protocol v2 routes against a real `bentoml serve`, through clients nobody here wrote:
Triton's `tritonclient.http` and KServe's `InferenceRESTClient`, in JSON and binary tensors, giving the
answers of /predict and /explain for the same images (prototype ids exactly, numbers within float32's
rounding)."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from bundle.manifest import read_bundle

tritonclient_http = pytest.importorskip("tritonclient.http", reason="pip install '.[dev]' (tritonclient[http])")
kserve = pytest.importorskip("kserve", reason="pip install '.[dev]' (kserve)")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.slow
TOP_K = 4


@pytest.fixture(scope="module")
def digits(tiny_bundle) -> np.ndarray:
    """The probe's test images [10, 1, 28, 28] in [0, 1] (the tiny model's value range)."""
    with np.load(tiny_bundle / "probe.npz") as probe:
        return probe["input.image"].astype(np.float32)


@pytest.fixture(scope="module")
def model(tiny_bundle) -> tuple[str, str]:
    manifest = read_bundle(tiny_bundle).manifest
    return manifest.name, manifest.version


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((pixels[0] * 255).round().astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def native_answers(server: str, images: list) -> dict[str, np.ndarray]:
    """What /predict and /explain (top_k=TOP_K) say about `images` (arrays or base64 strings), as arrays."""
    predictions = httpx.post(f"{server}/predict", json={"images": images}, timeout=60).json()["predictions"]
    explained = [httpx.post(f"{server}/explain", json={"image": image, "top_k": TOP_K}, timeout=60).json()
                 for image in images]
    return {"probabilities": np.array([p["probabilities"] for p in predictions]),
            "label": np.array([p["label"] for p in predictions]),
            "in_domain": np.array([p["in_domain"] for p in predictions]),
            "typicality": np.array([p["typicality"] for p in predictions]),
            "prototype_ids": np.array([[row["id"] for row in e["prototypes"]] for e in explained]),
            "prototype_distances": np.array([[row["distance"] for row in e["prototypes"]] for e in explained])}


def assert_same_answers(tensors: dict[str, np.ndarray], native: dict[str, np.ndarray]) -> None:
    assert tensors["label"].dtype == np.int64 and tensors["prototype_ids"].dtype == np.int64
    np.testing.assert_array_equal(tensors["label"], native["label"])
    np.testing.assert_array_equal(tensors["prototype_ids"], native["prototype_ids"])  # bit for bit
    np.testing.assert_array_equal(tensors["in_domain"], native["in_domain"])
    assert tensors["probabilities"].dtype == np.float32
    np.testing.assert_allclose(tensors["probabilities"], native["probabilities"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(tensors["prototype_distances"], native["prototype_distances"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tensors["typicality"], native["typicality"], atol=1e-6)  # native rounds to 6 places


@pytest.fixture(scope="module")
def triton(server):
    client = tritonclient_http.InferenceServerClient(server.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


def test_triton_client_reads_health_and_metadata_from_the_bundle(triton, model, tiny_bundle):
    name, version = model
    manifest = read_bundle(tiny_bundle).manifest
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(name) and triton.is_model_ready(name, version)
    assert not triton.is_model_ready("no-such-model")
    server = triton.get_server_metadata()
    assert server["name"] == "protoserve" and "binary_tensor_data" in server["extensions"]
    metadata = triton.get_model_metadata(name, version)
    assert metadata["versions"] == [version]
    spec = manifest.input
    assert metadata["inputs"] == [{"name": "image", "datatype": "FP32",
                                   "shape": [-1, spec.channels, spec.height, spec.width]},
                                  {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]}]
    outputs = {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]}
    assert outputs["probabilities"] == ("FP32", [-1, len(manifest.class_names)])
    assert outputs["label"] == ("INT64", [-1]) and outputs["prototype_ids"] == ("INT64", [-1, -1])
    assert outputs["prototype_distances"] == ("FP32", [-1, -1])
    assert (manifest.domain is not None) == ({"in_domain", "typicality"} <= set(outputs))
    with pytest.raises(InferenceServerException) as e:
        triton.get_model_metadata(name, "0.0.0-none")
    assert e.value.status() == "404" and version in e.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_triton_fp32_tensors_answer_as_predict_and_explain(server, triton, model, digits, binary):
    name, version = model
    image = tritonclient_http.InferInput("image", list(digits.shape), "FP32")
    image.set_data_from_numpy(digits, binary_data=binary)
    outputs = [tritonclient_http.InferRequestedOutput(n, binary_data=binary)
               for n in ("probabilities", "label", "prototype_ids", "prototype_distances", "in_domain", "typicality")]
    result = triton.infer(name, [image], model_version=version, outputs=outputs, parameters={"top_k": TOP_K})
    tensors = {o.name(): result.as_numpy(o.name()) for o in outputs}
    assert tensors["prototype_ids"].shape == (len(digits), TOP_K)
    assert result.get_response()["model_version"] == version
    assert_same_answers(tensors, native_answers(server, [d.tolist() for d in digits]))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_triton_png_files_answer_as_predict_and_explain(server, triton, model, digits, binary):
    files = [png(d) for d in digits[:5]]
    if binary:  # raw files
        data = np.array(files, dtype=np.object_)
    else:  # JSON carries BYTES as strings: base64, as the native routes take them
        data = np.array([base64.b64encode(f).decode() for f in files], dtype=np.object_)
    image = tritonclient_http.InferInput("image_bytes", [len(files)], "BYTES")
    image.set_data_from_numpy(data, binary_data=binary)
    result = triton.infer(model[0], [image], parameters={"top_k": TOP_K})  # no outputs named: all, binary
    tensors = {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}
    assert_same_answers(tensors, native_answers(server, [base64.b64encode(f).decode() for f in files]))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_kserve_rest_client_answers_as_predict_and_explain(server, model, digits, binary):
    name, version = model

    async def infer() -> tuple[dict, bool, bool]:
        client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", timeout=60))
        try:
            image = kserve.InferInput("image", list(digits.shape), "FP32")
            image.set_data_from_numpy(digits, binary_data=binary)
            request = kserve.InferRequest(name, [image], parameters={"top_k": TOP_K})
            response = await client.infer(server, request, model_name=name)
            live = await client.is_server_live(server)
            ready = await client.is_model_ready(server, name)
        finally:
            await client.close()
        assert response.model_name == name
        return {o.name: o.as_numpy() for o in response.outputs}, live, ready

    tensors, live, ready = asyncio.run(infer())
    assert live and ready
    assert_same_answers(tensors, native_answers(server, [d.tolist() for d in digits]))


def refusal(response: httpx.Response, status: int, reason: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["reason"] == reason and isinstance(body["error"], str) and body["model"]["name"]
    return body


def test_refusals_follow_the_native_rules(server, model, digits):
    infer = f"{server}/v2/models/{model[0]}/infer"

    def fp32(values: np.ndarray, **extra) -> dict:
        return {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(values.shape),
                            "data": values.reshape(-1).tolist()}], **extra}

    # The same faults as on /predict, the same statuses and reasons.
    for values, reason in ((digits[:1] * 3, "out_of_range"), (digits[:1, :, :27], "wrong_shape")):
        refusal(httpx.post(infer, json=fp32(values)), 400, reason)
        refusal(httpx.post(f"{server}/predict", json={"images": [values[0].tolist()]}), 400, reason)
    files = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["aGVsbG8="]}]}
    refusal(httpx.post(infer, json=files), 400, "not_an_image")
    refusal(httpx.post(f"{server}/predict", json={"images": ["aGVsbG8="]}), 400, "not_an_image")
    refusal(httpx.post(infer, json=fp32(np.zeros((65, 1, 28, 28), np.float32))), 400, "batch_too_large")
    refusal(httpx.post(infer, json=fp32(digits[:1], parameters={"top_k": 0})), 400, "top_k_out_of_range")
    refusal(httpx.post(infer, json=fp32(digits[:1], outputs=[{"name": "logits"}])), 400, "unknown_tensor")
    refusal(httpx.post(infer, content=b"{", headers={"content-type": "application/json"}), 400, "invalid_json")
    refusal(httpx.post(infer, content=b"{}", headers={"content-type": "text/plain"}), 415, "unsupported_media_type")
    refusal(httpx.post(infer, content=b" " * (9 * 1024 * 1024)), 413, "body_too_large")
    refusal(httpx.post(f"{server}/v2/models/other/infer", json=fp32(digits[:1])), 404, "unknown_model")
    refusal(httpx.post(f"{server}/v2/models/{model[0]}/versions/9.9.9/infer", json=fp32(digits[:1])), 404,
            "unknown_model")
    assert httpx.post(f"{server}/v2/models/{model[0]}/versions/{model[1]}/infer", json=fp32(digits[:1])).is_success
    wrong_method = httpx.get(infer)
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert httpx.get(f"{server}/v2/nothing").json()["error"]


def test_answers_name_their_version_and_are_counted(server, model, digits):
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28],
                        "data": digits[0].reshape(-1).tolist()}], "outputs": [{"name": "label"}]}
    response = httpx.post(f"{server}/v2/models/{model[0]}/infer", json=body)
    assert response.headers["x-model-version"] == model[1]
    assert [o["name"] for o in response.json()["outputs"]] == ["label"]
    counts = [line for line in httpx.get(f"{server}/metrics").text.splitlines()
              if line.startswith("protoserve_inference_seconds_count") and 'api="infer"' in line]
    assert counts and sum(float(line.rpartition(" ")[2]) for line in counts) >= 1
