"""The OpenAPI document against the running service: exact request shapes, and schemathesis finds nothing.

schemathesis (`--checks all`, configured by tests/service/schemathesis.toml) generates valid and
invalid requests from /docs.json and checks every answer against the document: status codes,
content types, answer and error schemas, refusal of schema-invalid bodies, acceptance of
schema-valid ones, 405 with a correct Allow header for undeclared methods.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml

from bundle.manifest import read_bundle
from service.openapi import IMAGE_CONTENT_REASONS, V2_CONTENT_REASONS

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES = 25  # per operation and phase: ~1,000 requests, under a minute against the tiny bundle


@pytest.fixture(scope="module")
def document(server) -> dict:
    return httpx.get(f"{server}/docs.json", timeout=30).json()


def body_schema(document: dict, route: str) -> dict:
    schema = document["paths"][route]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return {**schema, "components": document["components"]}


def valid(schema: dict, body: object) -> bool:
    return jsonschema.Draft4Validator(schema).is_valid(body)  # request bodies hold no $ref


def test_request_bodies_say_exactly_what_is_accepted(document, tiny_bundle):
    manifest = read_bundle(tiny_bundle).manifest
    n_active = sum(1 for row in manifest.prototypes if row.status == "active")
    plane = [[0.5] * 28] * 28
    predict, explain = body_schema(document, "/predict"), body_schema(document, "/explain")
    assert valid(predict, {"images": ["iVBORw0KGgo=", plane, [plane]]})
    for bad in ({"images": 0}, {"images": []}, {"images": [plane] * 65}, {"images": [[[0.5] * 27] * 28]},
                {"images": [[[2.0] * 28] * 28]}, {"images": [7]}, {}):
        assert not valid(predict, bad), bad
    assert valid(explain, {"image": plane, "top_k": n_active}) and valid(explain, {"image": "iVBORw0KGgo="})
    for bad in ({"image": None, "top_k": 0}, {"image": plane, "top_k": 0}, {"image": plane, "top_k": n_active + 1},
                {"image": plane, "top_k": "3"}, {"top_k": 1}):
        assert not valid(explain, bad), bad
    for route in ("/predict", "/explain", "/score_batch/submit"):
        operation = document["paths"][route]["post"]
        assert "multipart/form-data" in operation["requestBody"]["content"]
        for status in ("400", "413", "415"):
            schema = operation["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ProtoserveError"}, (route, status)
    assert "503" in document["paths"]["/predict"]["post"]["responses"]
    assert set(document["paths"]["/metadata"]) == {"get", "post"}
    assert "/score_batch/cancel" not in document["paths"]


def test_the_open_inference_routes_are_documented(document, tiny_bundle):
    manifest = read_bundle(tiny_bundle).manifest
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        infer = document["paths"][f"{prefix}/infer"]["post"]
        assert set(infer["responses"]) == {"200", "400", "404", "413", "415", "503"}
        assert "application/octet-stream" in infer["responses"]["200"]["content"]  # the binary data extension
        for status in ("400", "404"):
            schema = infer["responses"][status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/V2Error"}
        assert set(document["paths"][prefix]) == set(document["paths"][f"{prefix}/ready"]) == {"get"}
    schema = body_schema(document, "/v2/models/{name}/infer")
    plane = [0.5] * 784
    assert valid(schema, {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": plane}],
                          "parameters": {"top_k": 2}, "outputs": [{"name": "prototype_ids"}]})
    assert valid(schema, {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],
                                      "data": ["iVBORw0KGgo="]}]})
    for bad in ({"inputs": []}, {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x"]}]},
                {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [2.0]}]},
                {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["x"]}],
                 "outputs": [{"name": "logits"}]}):
        assert not valid(schema, bad), bad
    names = document["paths"]["/v2/models/{name}"]["get"]["parameters"][0]["schema"]["enum"]
    assert names == [manifest.name]


def test_schemathesis_finds_no_contract_violation(server, tmp_path):
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is not installed: pip install '.[dev]'"
    result = subprocess.run(
        [st, "--config-file", str(CONFIG), "run", f"{server}/docs.json", "--checks", "all",
         "--max-examples", str(EXAMPLES), "--seed", "10", "--workers", "1", "--suppress-health-check", "all",
         "--request-timeout", "60", "--report", "vcr", "--report-vcr-path", str(tmp_path / "cassette.yaml")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    # The relaxation of the configuration (schema-valid bodies may get a 400 on /predict, /explain and the
    # /v2 infer routes) holds only for images whose bytes are not a usable PNG/JPEG, and on /v2 for tensors
    # whose data does not fill their shape.
    interactions = yaml.safe_load((tmp_path / "cassette.yaml").read_text())["http_interactions"]
    answered = {"/predict": set(), "/explain": set(), "/v2 infer": set()}
    for interaction in interactions:
        route = httpx.URL(interaction["request"]["uri"]).path
        v2 = route.startswith("/v2/models/") and route.endswith("/infer")
        if v2:
            route = "/v2 infer"
        if route not in answered or (interaction.get("generation") or {}).get("mode") != "positive":
            continue
        status = int(interaction["response"]["status"]["code"])
        answered[route].add(status)
        if status == 400:
            reason = json.loads(interaction["response"]["body"]["string"])["reason"]
            assert reason in (V2_CONTENT_REASONS if v2 else IMAGE_CONTENT_REASONS), interaction["request"]
    assert all(200 in answered[route] for route in ("/predict", "/explain")), answered  # schema-valid arrays
    assert answered["/v2 infer"] <= {200, 400}, answered
