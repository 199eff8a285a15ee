"""The image routes' JSON answers: the bytes and headers of starlette's JSONResponse, built with less work.

starlette builds a JSON encoder and encodes every header name and value again for each response; an
image route answers with the same few headers (the version's, service/served_version.py) thousands of
times a second, so they are encoded once per version and the encoder once per process.
"""

from __future__ import annotations

import json

from starlette.responses import JSONResponse

# json.dumps with JSONResponse.render's arguments builds this encoder on every call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_CONTENT_TYPE = (b"content-type", JSONResponse.media_type.encode("latin-1"))


def raw_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """Headers as starlette sends them (lower-case names, latin-1), for JSONAnswer."""
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


class JSONAnswer(JSONResponse):
    """JSONResponse(content, status_code, headers) with `headers` given as raw_headers(headers): the same
    body and header list, in the same order."""

    def __init__(self, content: object, status_code: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = status_code
        self.background = None
        self.body = _ENCODER.encode(content).encode("utf-8")
        self.raw_headers = [*headers, (b"content-length", str(len(self.body)).encode("latin-1")), _CONTENT_TYPE]
