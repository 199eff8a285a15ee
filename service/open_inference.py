"""The Open Inference Protocol v2 over REST (KServe v2, also spoken by Triton and Seldon MLServer) at /v2.

The same model and answers as /predict and /explain, as standard tensors:

    GET  /v2                                  server metadata (name, version, extensions)
    GET  /v2/health/live, /v2/health/ready    {"live": true}, {"ready": true}
    GET  /v2/models/{name}[/versions/{v}]     inputs and outputs (names, datatypes, shapes) from the bundle
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer

Inputs (exactly one): `image`, FP32 [N, C, H, W] in the bundle's value range (the numbers /predict takes as
arrays), or `image_bytes`, BYTES [N] holding PNG/JPEG files (raw in binary data, base64 strings in JSON,
as /predict takes them). Outputs, all by default or those asked for by name: `probabilities` FP32 [N, K],
`label` INT64 [N], `prototype_ids` INT64 [N, k] and `prototype_distances` FP32 [N, k] (the k nearest active
prototypes, nearest first, k the request parameter `top_k`, default 3), and where the bundle has an
out-of-domain calibration `in_domain` BOOL [N] and `typicality` FP32 [N]. The images go through /predict's
adaptive batcher. Refusals follow the native routes' rules (same checks, statuses and counted reasons) in
the protocol's shape `{"error": ...}` (with the native `reason` and `model` beside it); a model name or
version this worker does not serve is a 404. In registry mode a worker serves the registry's active
version, so that is the one version its routes answer for.

RequestGate (service/middleware.py) hands every /v2 request here, reaching the worker's service instance
through its ServiceHandle.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import time
from dataclasses import dataclass

import numpy as np
from starlette.responses import JSONResponse, PlainTextResponse, Response

from inference.explain import nearest_prototypes_batch
from inference.preprocess import parse_top_k, tensor_to_batch, to_batch
from protoserve.errors import InputError
from service.batching import Overloaded
from service.metrics import count_out_of_domain, count_rejection, metrics, observer
from service.middleware import DEFAULT_MAX_BODY_BYTES, ServiceHandle, read_body
from service.openapi import OVERLOADED
from service.tensors import HEADER_LENGTH, InferRequest, Tensor, encode_response, parse_request

PREFIX = "/v2"
API = "infer"  # the api label of this route's metrics
EXTENSIONS = ["binary_tensor_data", "parameters"]
PLATFORM = "onnxruntime_onnx"
FP32_INPUT, BYTES_INPUT = "image", "image_bytes"
MODEL_ROUTE = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?$")
MEDIA_TYPES = ("application/json", "application/octet-stream")


def server_version() -> str:
    try:
        return importlib.metadata.version("protoserve")
    except importlib.metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "0+checkout"


def output_specs(v) -> list[dict]:
    """The model's output tensors as metadata: name, datatype, shape (-1: varies per request)."""
    K = len(v.manifest.class_names)
    specs = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, K]},
             {"name": "label", "datatype": "INT64", "shape": [-1]},
             {"name": "prototype_ids", "datatype": "INT64", "shape": [-1, -1]},
             {"name": "prototype_distances", "datatype": "FP32", "shape": [-1, -1]}]
    if v.domain is not None:  # without a calibration the bundle cannot say (ARCHITECTURE.md: never guesses)
        specs += [{"name": "in_domain", "datatype": "BOOL", "shape": [-1]},
                  {"name": "typicality", "datatype": "FP32", "shape": [-1]}]
    return specs


def input_specs(v) -> list[dict]:
    spec = v.manifest.input
    return [{"name": FP32_INPUT, "datatype": "FP32", "shape": [-1, spec.channels, spec.height, spec.width]},
            {"name": BYTES_INPUT, "datatype": "BYTES", "shape": [-1]}]


def model_input(inputs: list[Tensor], spec) -> np.ndarray:
    """The request's one input tensor -> the model input [N, C, H, W], by /predict's checks and conversions."""
    if len(inputs) != 1:
        raise InputError("wrong_type", f"send exactly one input ({FP32_INPUT} or {BYTES_INPUT}), not {len(inputs)}")
    tensor = inputs[0]
    if tensor.name == FP32_INPUT:
        if tensor.datatype != "FP32":
            raise InputError("wrong_type", f"{FP32_INPUT} is FP32, not {tensor.datatype}")
        return tensor_to_batch(tensor.data, spec)
    if tensor.name == BYTES_INPUT:
        if tensor.datatype != "BYTES" or tensor.data.ndim != 1:
            raise InputError("wrong_type" if tensor.datatype != "BYTES" else "wrong_shape",
                             f"{BYTES_INPUT} is BYTES of shape [N] (one encoded image each)")
        return to_batch(list(tensor.data), spec)
    raise InputError("unknown_tensor", f"no input named {tensor.name!r}: this model takes {FP32_INPUT} (FP32 "
                     f"[N, {spec.channels}, {spec.height}, {spec.width}]) or {BYTES_INPUT} (BYTES [N], PNG/JPEG)")


def answer_tensors(v, probabilities: np.ndarray, distances: np.ndarray, judged: np.ndarray,
                   k: int) -> dict[str, tuple[str, np.ndarray]]:
    """The output tensors by name: (datatype, array), from /predict's batcher output for N images."""
    nearest = nearest_prototypes_batch(distances, k, v.active)  # [N, k] indices into the table, nearest first
    ids = np.asarray(v.prototype_ids, dtype=np.int64)[nearest]
    tensors = {"probabilities": ("FP32", probabilities.astype(np.float32, copy=False)),
               "label": ("INT64", probabilities.argmax(axis=1).astype(np.int64)),
               "prototype_ids": ("INT64", ids),
               "prototype_distances": ("FP32", np.take_along_axis(distances, nearest, axis=1).astype(np.float32))}
    if v.domain is not None:
        tensors["in_domain"] = ("BOOL", judged[:, 0] == 1.0)
        tensors["typicality"] = ("FP32", judged[:, 1].astype(np.float32))
    return tensors


@dataclass
class ProtocolRefusal(Exception):
    """A refusal that is not an input's fault (no route, not loaded, overloaded): its status and body."""
    status: int
    body: dict


class OpenInference:
    """The /v2 routes as an ASGI app over the worker's served version."""

    def __init__(self, service: ServiceHandle, model: dict | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.service = service
        self.model = model  # {"name", "version"} named in refusals before the instance exists
        self.max_body_bytes = max_body_bytes
        self.server = {"name": "protoserve", "version": server_version(), "extensions": EXTENSIONS}

    async def __call__(self, scope, receive, send):
        path, method = scope["path"].rstrip("/") or "/", scope["method"]
        try:
            response = await self._route(path, method, scope, receive)
        except InputError as e:
            if e.reason != "unknown_model":
                count_rejection(e.reason)
            response = self._error(e.status, {**e.body(), "model": self._model_ref()})
        except ProtocolRefusal as r:
            response = self._error(r.status, r.body)
        return await response(scope, receive, send)

    async def _route(self, path: str, method: str, scope, receive) -> Response:
        if path == PREFIX:
            return self._only(method, "GET") or JSONResponse(self.server)
        if path in ("/v2/health/live", "/v2/health/ready"):
            kind = path.rsplit("/", 1)[1]
            ready = kind == "live" or self.service.served() is not None
            return self._only(method, "GET") or JSONResponse({kind: ready}, 200 if ready else 503)
        match = MODEL_ROUTE.match(path)
        if match is None:
            raise ProtocolRefusal(404, {"error": f"no route {path}: see /docs for the /v2 routes"})
        action = match["action"]
        refused = self._only(method, "POST" if action == "/infer" else "GET")
        if refused is not None:
            return refused
        v = self._version(match["name"], match["version"])
        if action == "/ready":
            return JSONResponse({"name": v.manifest.name, "ready": True}, headers=v.headers)
        if action is None:
            return JSONResponse({"name": v.manifest.name, "versions": [v.version], "platform": PLATFORM,
                                 "inputs": input_specs(v), "outputs": output_specs(v)}, headers=v.headers)
        return await self._infer(v, scope, receive)

    def _version(self, name: str, version: str | None):
        """The served version when it is the one asked for; else a 404 naming what is served."""
        v = self.service.served()
        if v is None:
            raise ProtocolRefusal(503, {"error": "the model is not loaded yet"})
        if name != v.manifest.name or version not in (None, v.version):
            asked = name if version is None else f"{name} version {version}"
            raise InputError("unknown_model", f"model {asked} is not served here; this service serves "
                             f"{v.manifest.name} version {v.version}", status=404)
        return v

    async def _infer(self, v, scope, receive) -> Response:
        started = time.perf_counter()
        media_type = (_header(scope, b"content-type") or "application/json").split(";")[0].strip().lower()
        if media_type not in MEDIA_TYPES:
            raise InputError("unsupported_media_type", f"content type {media_type!r}: send application/json (or "
                             "application/octet-stream with Inference-Header-Content-Length)", status=415)
        body = await read_body(scope, receive, self.max_body_bytes)
        request = parse_request(body, _header(scope, HEADER_LENGTH.encode()))
        batch = model_input(request.inputs, v.manifest.input)
        k = parse_top_k(request.parameters.get("top_k"), int(v.active.sum()))
        wanted = self._wanted(request, v)
        K = len(v.manifest.class_names)
        try:
            output = await v.classify(batch)
        except Overloaded as e:
            raise ProtocolRefusal(503, {"error": str(e), "reason": OVERLOADED, "model": v.ref()}) from None
        probabilities, distances, judged = output[:, :K], output[:, K:-2], output[:, -2:]
        tensors = answer_tensors(v, probabilities, distances, judged, k)
        if v.domain is not None:
            count_out_of_domain(v.model_id, API, int(len(batch) - tensors["in_domain"][1].sum()))
        header = {"model_name": v.manifest.name, "model_version": v.version}
        if request.id is not None:
            header["id"] = request.id
        content, json_length = encode_response(header, [(name, *tensors[name], binary) for name, binary in wanted])
        observer(metrics().inference_seconds, *v.model_id, API)(time.perf_counter() - started)
        headers = dict(v.headers)
        if json_length is None:
            return Response(content, 200, headers, media_type="application/json")
        headers["Inference-Header-Content-Length"] = str(json_length)
        return Response(content, 200, headers, media_type="application/octet-stream")

    @staticmethod
    def _wanted(request: InferRequest, v) -> list[tuple[str, bool]]:
        """(name, binary) of each output to send, in the order asked (every output when none is named)."""
        names = [spec["name"] for spec in output_specs(v)]
        if request.outputs is None:
            return [(name, request.binary_output) for name in names]
        for output in request.outputs:
            if output.name not in names:
                raise InputError("unknown_tensor", f"no output named {output.name!r}: this model has "
                                 f"{', '.join(names)}")
        return [(output.name, output.binary) for output in request.outputs]

    def _model_ref(self) -> dict | None:
        v = self.service.served()
        return v.ref() if v is not None else self.model

    @staticmethod
    def _only(method: str, allowed: str) -> Response | None:
        if method == allowed:
            return None
        return PlainTextResponse("Method Not Allowed", 405, headers={"Allow": allowed})

    @staticmethod
    def _error(status: int, body: dict) -> Response:
        return Response(json.dumps(body), status, media_type="application/json")


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None
