"""ASGI middleware in front of BentoML's app: body-size cap, JSON check, multipart uploads, GET aliases,
the API document.

BentoML reads request bodies without a size limit; this middleware reads them first, answers 413
past `max_body_bytes` (from Content-Length at once, else while streaming), and hands the app a body
it has already checked. On the image routes it turns multipart/form-data uploads into the JSON
body the API takes (files become base64 strings), so one API function serves both. On the image
and catalogue routes it refuses bodies that are not a JSON object with a 400 that names the
problem, in the service's error shape (BentoML's own parse errors have another). Every refusal is
counted in protoserve_rejected_inputs_total{reason}. GET /docs.json answers the document built by
service/openapi.py instead of BentoML's untyped one. Everything under a prefix of `prefixed_apps` (/v2,
the Open Inference Protocol of service/open_inference.py) goes to that app.

The gate reaches the worker's service instance through a `ServiceHandle`, with which the instance
registers itself when it is built. Through it /readyz names the version the worker serves, and a
checked POST to an image route is answered here, with the request the gate has already parsed,
instead of being handed on to BentoML's router, request context, input validation and API wrapper,
which would parse the body again to call the same handler (the BentoML APIs call it too). Until an
instance has registered, the handle answers nothing and the request goes on to BentoML.
"""

from __future__ import annotations

import base64
import json
from typing import Protocol

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from protoserve.errors import InputError
from service.metrics import count_rejection

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


class GatedService(Protocol):
    """What the gate asks of the service instance."""

    current: object  # the ServedVersion answering new requests

    def describe(self) -> dict:
        """The version this worker serves: {"worker", "model", "generation", ...}."""

    async def answer_route(self, route: str, request: dict) -> Response:
        """An image route's answer to the parsed request."""


class ServiceHandle:
    """The gate's hop into this worker's service instance, which calls `register(self)` when it is built."""

    def __init__(self) -> None:
        self._service: GatedService | None = None

    def register(self, service: GatedService) -> None:
        self._service = service

    def served(self):
        """The version this worker serves (service/served_version.py ServedVersion), or None before its
        instance exists."""
        return self._service.current if self._service is not None else None

    def describe(self) -> dict | None:
        """The version this worker serves, or None before its instance exists (not ready)."""
        return self._service.describe() if self._service is not None else None

    async def answer(self, route: str, request: dict) -> Response | None:
        """The image route's answer, or None before the instance exists: the request goes on to the app."""
        return await self._service.answer_route(route, request) if self._service is not None else None


class RequestGate:
    def __init__(self, app, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 image_routes: tuple[str, ...] = ("/predict", "/explain"),
                 catalogue_routes: tuple[str, ...] = ("/metadata", "/prototypes"), max_files: int = 64,
                 model: dict | None = None, document=None, service: ServiceHandle | None = None,
                 answer_images: bool = True, prefixed_apps: dict | None = None):
        self.app = app
        # path prefix -> the ASGI app that answers everything under it (the /v2 protocol routes): it reads
        # and checks the body itself
        self.prefixed_apps = prefixed_apps or {}
        self.service = service  # the worker's service instance, once it has registered
        self.answer_images = answer_images and service is not None  # False: BentoML answers the image routes
        self.document = document  # () -> the OpenAPI document as a dict, built on the first GET /docs.json
        self._document: dict | None = None
        self.model = model  # {"name", "version"}: named in refusals too, like every other answer
        self.max_body_bytes = max_body_bytes
        self.image_routes = image_routes
        self.catalogue_routes = catalogue_routes
        self.max_files = max_files

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].rstrip("/") or "/"
        for prefix, app in self.prefixed_apps.items():
            if path == prefix or path.startswith(prefix + "/"):
                return await app(scope, receive, send)
        if path == "/readyz" and scope["method"] == "GET" and self.service is not None:
            return await self._readyz(scope, receive, send)
        if scope["method"] == "GET" and path == "/docs.json" and self.document is not None:
            if self._document is None:
                self._document = self.document()
            return await JSONResponse(self._document)(scope, receive, send)
        if path in self.catalogue_routes and scope["method"] != "POST":
            return await self._catalogue_get(scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        request = None
        try:
            body = await read_body(scope, receive, self.max_body_bytes)
            if path in self.image_routes:
                request, multipart = await self._to_request(scope, body)
            elif path in self.catalogue_routes:  # the catalogue takes no arguments: an empty body or any object
                if request_media_type(scope) != "application/json":
                    raise InputError("unsupported_media_type", f"{path} takes no uploads: send application/json "
                                     "(an empty body or {})", status=415)
                body = body if body.strip() else b"{}"
                json_object(body)
                scope = _as_json_post(scope, body)
        except InputError as e:
            count_rejection(e.reason)
            held = self.service.describe() if self.service is not None else None
            model = held["model"] if held else self.model  # the version this worker holds now
            body = {**e.body(), "model": model} if model else e.body()
            return await JSONResponse(body, status_code=e.status)(scope, receive, send)
        if request is not None:
            if self.answer_images and scope["path"] == path:  # "/predict/" goes on: BentoML redirects it
                response = await self.service.answer(path, request)
                if response is not None:
                    return await response(scope, receive, send)
            body = json.dumps(request).encode() if multipart else body
            scope = _as_json_post(scope, body)
        return await self.app(scope, _replay(body, receive), send)

    async def _readyz(self, scope, receive, send):
        """Ready: 200 with the version this worker holds (body and X-Model-Version); else BentoML's 503."""
        held = self.service.describe()
        if held is None:
            return await self.app(scope, receive, send)
        headers = {"x-model-version": held["model"]["version"], "x-protoserve-worker": str(held["worker"])}
        return await JSONResponse({"status": "ready", **held}, headers=headers)(scope, receive, send)

    async def _catalogue_get(self, scope, receive, send):
        """The read-only catalogue answers GET too: BentoML APIs are POST, so a GET is served as a POST
        with {}. Any other method is a 405 naming both."""
        if scope["method"] != "GET":
            response = PlainTextResponse("Method Not Allowed", 405, headers={"Allow": "GET, POST"})
            return await response(scope, receive, send)
        return await self.app(_as_json_post(scope, b"{}"), _replay(b"{}", receive), send)

    async def _to_request(self, scope, body: bytes) -> tuple[dict, bool]:
        """An image route's body as the request object, and whether it came as multipart/form-data."""
        if request_media_type(scope) == "multipart/form-data":
            fields = await self._form_fields(scope, body)
            return _form_to_request(fields, scope["path"].rstrip("/")), True
        return json_object(body), False

    async def _form_fields(self, scope, body: bytes) -> list[tuple[str, object]]:
        request = Request(scope, _replay(body))
        try:
            form = await request.form(max_files=self.max_files, max_fields=16)
        except Exception as e:  # starlette raises several types for a malformed multipart body
            detail = getattr(e, "detail", None) or str(e) or type(e).__name__
            raise InputError("malformed_multipart", f"multipart body is malformed ({detail})") from None
        fields = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                value = base64.b64encode(await value.read()).decode("ascii")
            fields.append((key, value))
        await form.close()
        return fields


async def read_body(scope, receive, max_bytes: int) -> bytes:
    """The whole request body, refused with a 413 as soon as it is known to be over max_bytes."""
    declared = _header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise InputError("body_too_large", f"body of {int(declared)} bytes is over the "
                         f"{max_bytes} byte limit", status=413)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise InputError("body_too_large", f"body is over the {max_bytes} byte limit", status=413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def request_media_type(scope) -> str:
    """"application/json" (also when unsaid) or "multipart/form-data"; anything else is a 415."""
    media_type = (_header(scope, b"content-type") or "application/json").split(";")[0].strip().lower()
    if media_type not in ("application/json", "multipart/form-data"):
        raise InputError("unsupported_media_type", f"content type {media_type!r}: send application/json "
                         "or multipart/form-data", status=415)
    return media_type


def json_object(body: bytes) -> dict:
    """The body as a JSON object, or a 400 naming what is wrong with it."""
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError("invalid_json", f"body is not valid JSON ({e})") from None
    if not isinstance(parsed, dict):
        raise InputError("wrong_type", f"body must be a JSON object, not {type(parsed).__name__}")
    return parsed


def _form_to_request(fields: list[tuple[str, object]], path: str) -> dict:
    """Multipart fields -> the JSON request: every file or "images"/"image" field is an image, in order."""
    images = [v for k, v in fields if k in ("images", "image", "file", "files")]
    options = {k: v for k, v in fields if k in ("abstain", "canonicalize")}  # "true"/"false": the API parses them
    if path == "/predict":
        return {"images": images, **options}
    request: dict = options
    if images:
        request["image"] = images[0]
    top_k = next((v for k, v in fields if k == "top_k"), None)
    if top_k is not None:
        try:
            request["top_k"] = int(top_k)
        except ValueError:
            raise InputError("wrong_type", f'"top_k" must be an integer, not {top_k!r}') from None
    return request


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _as_json_post(scope, body: bytes) -> dict:
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return {**scope, "method": "POST", "headers": headers}


def _replay(body: bytes, then=None):
    """A receive() that hands over `body` once, then waits on the real one (for the disconnect)."""
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return await then() if then is not None else {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive
