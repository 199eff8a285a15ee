"""The image routes' JSON answers: starlette's JSONResponse, with less work per answer.

starlette builds a JSON encoder and encodes every header name and value again for each response; an
image route answers with the same few headers (the version's, service/served_version.py) thousands of
times a second, so they are encoded once per version. The body is written by orjson, several times
faster than the json module: the same JSON values (a number may be spelled differently, 0.00009 for
9e-05, the same float when read). Where orjson and JSONResponse would part ways, the json module
writes it as JSONResponse does: orjson writes NaN and infinity as null where json refuses them (an
error, answered 500), so a body with a null in it is written again by json, as is anything orjson
refuses.
"""

from __future__ import annotations

import json

import orjson
from starlette.responses import JSONResponse

# JSONResponse.render's json.dumps arguments, with the encoder built once instead of per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_CONTENT_TYPE = (b"content-type", JSONResponse.media_type.encode("latin-1"))


def raw_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """Headers as starlette sends them (lower-case names, latin-1), for JSONAnswer."""
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


def json_body(content: object) -> bytes:
    """`content` as JSON: the values JSONResponse would write, or its error."""
    try:
        body = orjson.dumps(content)
    except TypeError:  # orjson.JSONEncodeError: a type or value orjson does not write
        body = None
    if body is None or b"null" in body:
        return _ENCODER.encode(content).encode("utf-8")
    return body


class JSONAnswer(JSONResponse):
    """JSONResponse(content, status_code, headers) with `headers` given as raw_headers(headers): the same
    header list in the same order, the body written by json_body."""

    def __init__(self, content: object, status_code: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = status_code
        self.background = None
        self.body = json_body(content)
        self.raw_headers = [*headers, (b"content-length", str(len(self.body)).encode("latin-1")), _CONTENT_TYPE]
