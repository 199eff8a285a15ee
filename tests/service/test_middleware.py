"""The request gate as an ASGI app with a test client: 413, JSON checks, multipart, GET aliases."""

from __future__ import annotations

import base64
import json

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from service.metrics import metrics
from service.middleware import RequestGate, ServiceHandle


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"method": request.method, "type": request.headers.get("content-type"),
                         "body": body.decode("latin-1")})


def client(max_body_bytes: int = 1000) -> TestClient:
    app = Starlette(routes=[Route(p, echo, methods=["GET", "POST"]) for p in ("/predict", "/explain", "/metadata",
                                                                             "/other")])
    return TestClient(RequestGate(app, max_body_bytes=max_body_bytes))


def rejected(reason: str) -> float:
    return metrics().rejected_inputs.labels(reason)._value.get()


def expect_refusal(response, status: int, reason: str, before: float) -> None:
    assert response.status_code == status, response.text
    assert response.json()["reason"] == reason and response.json()["error"]
    assert rejected(reason) == before + 1


def test_json_passes_through_unchanged():
    r = client().post("/predict", json={"images": [1]})
    assert r.status_code == 200 and json.loads(r.json()["body"]) == {"images": [1]}


@pytest.mark.parametrize("path", ["/predict", "/other"])
def test_declared_oversized_body_is_413(path):
    before = rejected("body_too_large")
    r = client().post(path, content=b"x" * 1001, headers={"content-type": "application/json"})
    expect_refusal(r, 413, "body_too_large", before)


def test_streamed_oversized_body_is_413():
    def chunks():
        for _ in range(5):
            yield b"x" * 300

    before = rejected("body_too_large")
    r = client().post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    expect_refusal(r, 413, "body_too_large", before)


def test_a_body_at_the_limit_passes():
    body = json.dumps({"images": ["a" * 970]}).encode()
    assert len(body) <= 1000
    assert client().post("/predict", content=body, headers={"content-type": "application/json"}).status_code == 200


@pytest.mark.parametrize("body, reason", [(b"{bad", "invalid_json"), (b"", "invalid_json"),
                                          (b"\xff\xfe", "invalid_json"), (b"[1, 2]", "wrong_type"),
                                          (b'"text"', "wrong_type")])
def test_bodies_that_are_not_a_json_object(body, reason):
    before = rejected(reason)
    r = client().post("/explain", content=body, headers={"content-type": "application/json"})
    expect_refusal(r, 400, reason, before)


def test_unsupported_media_type():
    before = rejected("unsupported_media_type")
    r = client().post("/predict", content=b"abc", headers={"content-type": "text/plain"})
    expect_refusal(r, 415, "unsupported_media_type", before)


def test_multipart_uploads_become_json():
    files = [("images", ("a.png", b"PNG-A", "image/png")), ("images", ("b.png", b"PNG-B", "image/png"))]
    r = client().post("/predict", files=files)
    assert r.json()["type"] == "application/json"
    assert json.loads(r.json()["body"]) == {"images": [base64.b64encode(b"PNG-A").decode(),
                                                       base64.b64encode(b"PNG-B").decode()]}
    r = client().post("/explain", files=[("image", ("a.png", b"PNG-A", "image/png"))], data={"top_k": "2"})
    assert json.loads(r.json()["body"]) == {"image": base64.b64encode(b"PNG-A").decode(), "top_k": 2}


def test_multipart_bad_top_k_and_malformed_body():
    before = rejected("wrong_type")
    r = client().post("/explain", files=[("image", ("a.png", b"A", "image/png"))], data={"top_k": "three"})
    expect_refusal(r, 400, "wrong_type", before)
    for content_type in ("multipart/form-data; boundary=x", "multipart/form-data"):
        before = rejected("malformed_multipart")
        r = client().post("/explain", content=b"--nope\r\n", headers={"content-type": content_type})
        expect_refusal(r, 400, "malformed_multipart", before)


def test_get_on_catalogue_routes_is_a_post_with_an_empty_object():
    r = client().get("/metadata")
    assert r.json() == {"method": "POST", "type": "application/json", "body": "{}"}
    assert client().get("/other").json()["method"] == "GET"


def test_catalogue_routes_take_an_empty_body_or_a_json_object_and_only_get_and_post():
    c = client()
    assert c.post("/metadata", content=b"").json()["body"] == "{}"
    assert json.loads(c.post("/metadata", json={"x": 1}).json()["body"]) == {"x": 1}
    before = rejected("invalid_json")
    expect_refusal(c.post("/metadata", content=b"\x00", headers={"content-type": "application/json"}), 400,
                   "invalid_json", before)
    before = rejected("unsupported_media_type")
    expect_refusal(c.post("/metadata", content=b"\x00", headers={"content-type": "text/plain"}), 415,
                   "unsupported_media_type", before)
    for method in ("PUT", "PATCH", "DELETE", "OPTIONS"):
        r = c.request(method, "/metadata")
        assert r.status_code == 405 and r.headers["allow"] == "GET, POST", method


def test_docs_json_is_the_document_given():
    app = Starlette(routes=[Route("/docs.json", echo)])
    built = []
    gate = TestClient(RequestGate(app, document=lambda: built.append(1) or {"openapi": "3.0.2", "paths": {}}))
    assert gate.get("/docs.json").json() == {"openapi": "3.0.2", "paths": {}}
    assert gate.get("/docs.json").status_code == 200 and built == [1]  # built once


def test_score_gate_turns_not_finished_into_409_and_refuses_cancel():
    from service.score_task import ScoreGate

    async def not_finished(request: Request) -> JSONResponse:  # BentoML's answer for an unfinished task
        if "task_id" not in request.query_params:
            return JSONResponse({"error": "task_id is required"}, status_code=400)
        return JSONResponse({"error": "task 1 is not completed yet"}, status_code=400)

    app = Starlette(routes=[Route("/score_batch/get", not_finished), Route("/score_batch/retry", not_finished,
                                                                           methods=["POST"])])
    c = TestClient(ScoreGate(app))
    assert c.get("/score_batch/get", params={"task_id": "1"}).status_code == 409
    assert c.post("/score_batch/retry", params={"task_id": ""}).status_code == 409
    assert c.get("/score_batch/get").status_code == 400  # no task_id: the request is wrong
    r = c.put("/score_batch/cancel", params={"task_id": "1"})
    assert r.status_code == 404 and "cannot cancel" in r.json()["error"]


class FakeService:
    """A registered service instance: answers every image route, records what it was asked."""

    def __init__(self):
        self.answered = []

    def describe(self) -> dict:
        return {"worker": 7, "model": {"name": "m", "version": "v2"}, "generation": 3}

    async def answer_route(self, route: str, request: dict):
        self.answered.append((route, request))
        return JSONResponse({"answered": route})


def test_the_gate_answers_image_routes_with_the_request_it_parsed():
    handle = ServiceHandle()
    c = TestClient(RequestGate(Starlette(routes=[Route(p, echo, methods=["POST"]) for p in ("/predict", "/explain",
                                                                                             "/predict/")]),
                               max_body_bytes=1000, service=handle))
    # No instance registered yet: the app gets the request, multipart as JSON.
    r = c.post("/explain", files=[("image", ("a.png", b"A", "image/png"))], data={"top_k": "1"})
    assert json.loads(r.json()["body"])["top_k"] == 1 and r.json()["type"] == "application/json"
    assert c.get("/readyz").status_code == 404  # not ready: the app answers (BentoML's 503)
    service = FakeService()
    handle.register(service)
    r = c.get("/readyz")
    assert r.json()["model"]["version"] == "v2" and r.headers["x-model-version"] == "v2"
    answered = service.answered
    assert c.post("/predict", json={"images": [1], "x": 2}).json() == {"answered": "/predict"}
    r = c.post("/explain", files=[("image", ("a.png", b"PNG-A", "image/png"))], data={"top_k": "2"})
    assert r.json() == {"answered": "/explain"}
    assert answered == [("/predict", {"images": [1], "x": 2}),
                        ("/explain", {"image": base64.b64encode(b"PNG-A").decode(), "top_k": 2})]
    # Refusals stay the gate's and are counted; the answer is never asked.
    count = len(answered)
    before = rejected("invalid_json")
    expect_refusal(c.post("/predict", content=b"{bad", headers={"content-type": "application/json"}), 400,
                   "invalid_json", before)
    before = rejected("body_too_large")
    expect_refusal(c.post("/predict", content=b"x" * 1001, headers={"content-type": "application/json"}), 413,
                   "body_too_large", before)
    assert len(answered) == count
    # Another spelling of the route goes on to the app (BentoML redirects "/predict/").
    assert c.post("/predict/", json={"images": []}).json()["method"] == "POST"
