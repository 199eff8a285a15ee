"""Batch scoring over HTTP: the `/score_batch` async task of the service, with the batch core's rows.

    POST /score_batch/submit   {"images": [IMAGE, ...], "top_k": 3}, or multipart/form-data with
                               files in "images" (and "top_k" as a form field) -> {"task_id", "status"}
    GET  /score_batch/status?task_id=...   -> {"task_id", "status", ...}
    GET  /score_batch/get?task_id=...      -> {"model", "images", "failed", "rows": [...]}

Rows are those of `protoserve score` (scoring/rows.py ROW_FIELDS); input_id is "images[<i>]".
IMAGE is what /predict takes: a base64 PNG/JPEG string or a numeric array; a string is never
taken as a path or URL, so a caller cannot make the server read its own files. A bad image is a
row with an error, as in the CLI. BentoML queues a task before running its function, so the
request's shape and size are checked at submission by ScoreGate (ASGI): over MAX_TASK_IMAGES
images, an empty or malformed list, or a bad top_k are refused there with a JSON 4xx.
"""

from __future__ import annotations

import asyncio
import base64
import json
from urllib.parse import parse_qs

import numpy as np

from bundle.manifest import Manifest, read_bundle
from inference.domain import parse_flag
from inference.explain import active_mask
from inference.model import bundle_location
from inference.preprocess import DEFAULT_LIMITS, parse_top_k
from protoserve.errors import InputError
from scoring.rows import BatchScorer
from service.metrics import count_out_of_domain, count_rejection, metrics
from service.middleware import (
    DEFAULT_MAX_BODY_BYTES,
    _as_json_post,
    _replay,
    json_object,
    read_body,
    request_media_type,
)

MAX_TASK_IMAGES = 1024
ROUTE = "/score_batch"


def check_request(images: object, top_k: object, n_active: int) -> int:
    """The task's arguments as the gate and the task check them; returns top_k."""
    if images is None:
        raise InputError("missing_field", 'body needs "images": a list of images')
    if not isinstance(images, list):
        raise InputError("wrong_type", '"images" must be a list of images')
    if not images:
        raise InputError("empty_batch", '"images" is empty')
    if len(images) > MAX_TASK_IMAGES:
        raise InputError("batch_too_large", f'"images" holds {len(images)} images; at most {MAX_TASK_IMAGES} '
                         "per batch task (use `protoserve score` for more)", status=413)
    return parse_top_k(top_k, n_active)


async def score_images(manifest: Manifest, images: object, top_k: object, classify, abstain: bool = False) -> dict:
    """Score a list of images with the batch core; `classify` is the service's adaptive batcher
    ([N, C, H, W] -> [N, K + M (+ D)]: probabilities, distances, then the out-of-domain rule's features
    if it reads any); `abstain` withholds the label of out-of-domain rows."""
    k = check_request(images, top_k, int(active_mask(manifest).sum()))
    scorer = BatchScorer(manifest, k)
    x, errors = await asyncio.to_thread(scorer.prepare, images)
    ok = np.array([e is None for e in errors], dtype=bool)
    good = x[ok]
    K = len(manifest.class_names)
    outputs = [np.asarray(await classify(good[lo:lo + DEFAULT_LIMITS.max_batch]))
               for lo in range(0, len(good), DEFAULT_LIMITS.max_batch)]
    KM = K + len(manifest.prototypes)
    both = np.concatenate(outputs) if outputs else np.zeros((0, KM + scorer.feature_width), np.float32)
    ids = [f"images[{i}]" for i in range(len(images))]
    columns = scorer.rows(0, ids, ok, errors, both[:, :K], both[:, K:KM], both[:, KM:], flat=scorer.flat(x))
    counter = metrics().batch_images
    counter.labels("scored").inc(int(ok.sum()))
    counter.labels("failed").inc(columns.failed)
    count_out_of_domain((manifest.name, manifest.version), "score_batch", columns.out_of_domain)
    return {"model": {"name": manifest.name, "version": manifest.version}, "images": len(columns),
            "failed": columns.failed, "rows": columns.records(abstain)}


def _has_task_id(scope) -> bool:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    return "task_id" in query


def _unfinished_is_409(send):
    """BentoML answers /get and /retry of a task that has not finished with a 400, as if the request
    were wrong; with a task_id given, that 400 means "not yet", which is a 409 Conflict."""
    async def send_409(message):
        if message["type"] == "http.response.start" and message["status"] == 400:
            message = {**message, "status": 409}
        await send(message)
    return send_409


class ScoreGate:
    """ASGI: checks a /score_batch submission before BentoML queues it; multipart files -> base64 JSON."""

    def __init__(self, app, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self._manifest: Manifest | None = None

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "").rstrip("/")
        if scope["type"] == "http" and path == f"{ROUTE}/cancel":  # `bentoml serve` cannot cancel tasks
            from starlette.responses import JSONResponse

            body = {"error": "this server cannot cancel batch tasks; a task runs to its end"}
            return await JSONResponse(body, status_code=404)(scope, receive, send)
        if scope["type"] == "http" and path in (f"{ROUTE}/get", f"{ROUTE}/retry") and _has_task_id(scope):
            return await self.app(scope, receive, _unfinished_is_409(send))
        if scope["type"] != "http" or scope["method"] != "POST" or path not in (ROUTE, f"{ROUTE}/submit"):
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        try:
            body = await read_body(scope, receive, self.max_body_bytes)
            request = await self._parse(scope, body)
            check_request(request.get("images"), request.get("top_k"), self.n_active())
            parse_flag(request.get("abstain"), "abstain", False)  # refused at submission, like top_k
        except InputError as e:
            count_rejection(e.reason)
            m = self.manifest()
            body = {**e.body(), "model": {"name": m.name, "version": m.version}}  # like every other answer
            return await JSONResponse(body, status_code=e.status)(scope, receive, send)
        body = json.dumps(request).encode()
        return await self.app(_as_json_post(scope, body), _replay(body, receive), send)

    def manifest(self) -> Manifest:
        """The served bundle's manifest (read on first use, in the worker: the app is built before)."""
        if self._manifest is None:
            self._manifest = read_bundle(bundle_location()).manifest
        return self._manifest

    def n_active(self) -> int:
        return int(active_mask(self.manifest()).sum())

    async def _parse(self, scope, body: bytes) -> dict:
        if request_media_type(scope) == "multipart/form-data":
            return await self._form(scope, body)
        return json_object(body)

    async def _form(self, scope, body: bytes) -> dict:
        from starlette.datastructures import UploadFile
        from starlette.requests import Request

        try:
            form = await Request(scope, _replay(body)).form(max_files=MAX_TASK_IMAGES + 1, max_fields=16)
        except Exception as e:  # starlette raises several types for a malformed or oversized multipart body
            detail = getattr(e, "detail", None) or str(e) or type(e).__name__
            if "too many files" in detail.lower():
                raise InputError("batch_too_large", f"more than {MAX_TASK_IMAGES} files; at most {MAX_TASK_IMAGES} "
                                 "per batch task", status=413) from None
            raise InputError("malformed_multipart", f"multipart body is malformed ({detail})") from None
        request: dict = {"images": []}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                request["images"].append(base64.b64encode(await value.read()).decode("ascii"))
            elif key == "abstain":
                request["abstain"] = value  # "true"/"false": the task parses it
            elif key == "top_k":
                try:
                    request["top_k"] = int(value)
                except ValueError:
                    raise InputError("wrong_type", f'"top_k" must be an integer, not {value!r}') from None
        await form.close()
        return request
