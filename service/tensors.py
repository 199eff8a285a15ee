"""Open Inference Protocol v2 tensors over REST: a request body in, a response body out.

The JSON form of the protocol (KServe v2 / Triton): a request is `{"id", "parameters", "inputs": [{"name",
"datatype", "shape", "parameters", "data"}], "outputs": [{"name", "parameters"}]}`, a response
`{"model_name", "model_version", "id", "parameters", "outputs": [{"name", "datatype", "shape", "data"}]}`.
The binary data extension: the body is the JSON header (its length in the `Inference-Header-Content-Length`
header) followed by the raw bytes of the inputs that say `"binary_data_size"`, in the order of the inputs;
an output asked for with `"binary_data": true` (or every output, with the request parameter
`"binary_data_output": true`) is sent the same way after the response's JSON. Raw bytes are little-endian
and row-major; a BYTES element is a 4-byte little-endian length followed by its bytes.

Pure functions of bytes and numpy arrays; every problem is an InputError naming it (service/open_inference.py
turns it into the protocol's `{"error": ...}`).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

from protoserve.errors import InputError

HEADER_LENGTH = "inference-header-content-length"
# The protocol's datatypes this service reads or writes, with their numpy types (little-endian in raw bytes).
DTYPES = {"BOOL": np.dtype(np.bool_), "INT64": np.dtype("<i8"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
          "UINT8": np.dtype(np.uint8), "INT32": np.dtype("<i4")}


@dataclass
class Tensor:
    """One input tensor of a request: its values are a numpy array (BYTES: an object array of bytes or str)."""
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray


@dataclass
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    id: str | None
    parameters: dict
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None  # None: every output
    binary_output: bool = False  # the request's "binary_data_output": the default for every output


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """An infer request's body (JSON, or JSON followed by binary tensor data) -> InferRequest."""
    json_end = len(body)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InputError("bad_binary_data", f"Inference-Header-Content-Length is {header_length!r}: it must be "
                             f"the byte length of the JSON header, at most the body's {len(body)} bytes")
        json_end = int(header_length)
    try:
        header = json.loads(body[:json_end])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError("invalid_json", f"request header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise InputError("wrong_type", f"request must be a JSON object, not {_json_type(header)}")
    parameters = _object(header.get("parameters"), "parameters")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InputError("missing_field", '"inputs" must be a non-empty list of tensors')
    raw, offset = body[json_end:], 0
    tensors = []
    for i, spec in enumerate(inputs):
        tensor, offset = _input(spec, i, raw, offset)
        tensors.append(tensor)
    if offset != len(raw):
        raise InputError("bad_binary_data", f"the body holds {len(raw) - offset} bytes after the tensors' "
                         "binary_data_size bytes")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise InputError("wrong_type", '"binary_data_output" must be true or false')
    return InferRequest(_request_id(header.get("id")), parameters, tensors,
                        _requested_outputs(header.get("outputs"), binary_output), binary_output)


def _input(spec: object, i: int, raw: bytes, offset: int) -> tuple[Tensor, int]:
    where = f"inputs[{i}]"
    if not isinstance(spec, dict):
        raise InputError("wrong_type", f"{where} must be an object")
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if not isinstance(name, str):
        raise InputError("missing_field", f'{where} needs a "name" string')
    if not isinstance(datatype, str) or (datatype != "BYTES" and datatype not in DTYPES):
        raise InputError("wrong_type", f"{where} ({name}): datatype {datatype!r} is not one this service reads "
                         f"({', '.join(['BYTES', *DTYPES])})")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                               for d in shape)):
        raise InputError("wrong_shape", f'{where} ({name}): "shape" must be a list of non-negative integers')
    size = int(np.prod(shape, dtype=np.int64)) if shape else 1
    parameters = _object(spec.get("parameters"), f"{where}.parameters")
    if "binary_data_size" in parameters:
        n = parameters["binary_data_size"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 0 or offset + n > len(raw):
            raise InputError("bad_binary_data", f"{where} ({name}): binary_data_size {n!r} is past the "
                             f"{len(raw) - offset} bytes left in the body")
        data = _from_bytes(raw[offset:offset + n], datatype, size, f"{where} ({name})")
        return Tensor(name, datatype, shape, data.reshape(shape)), offset + n
    if "data" not in spec:
        raise InputError("missing_field", f'{where} ({name}) needs "data" or parameters.binary_data_size')
    return Tensor(name, datatype, shape, _from_json(spec["data"], datatype, shape, size, f"{where} ({name})")), offset


def _from_json(data: object, datatype: str, shape: list[int], size: int, where: str) -> np.ndarray:
    """JSON "data" (flat or nested, row-major) -> an array of `shape`."""
    flat = list(_flatten(data if isinstance(data, list) else [data]))
    if len(flat) != size:
        raise InputError("wrong_shape", f"{where}: data holds {len(flat)} values; shape {shape} needs {size}")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise InputError("wrong_type", f"{where}: BYTES data in JSON must be strings")
        array = np.empty(size, dtype=object)
        array[:] = flat
        return array.reshape(shape)
    kind = bool if datatype == "BOOL" else (int if datatype in ("INT64", "INT32", "UINT8") else (int, float))
    if not all(isinstance(v, kind) and (datatype == "BOOL" or not isinstance(v, bool)) for v in flat):
        raise InputError("wrong_type", f"{where}: {datatype} data must be JSON "
                         f"{'booleans' if datatype == 'BOOL' else 'numbers'}")
    try:
        return np.asarray(flat, dtype=DTYPES[datatype]).reshape(shape)
    except OverflowError:
        raise InputError("out_of_range", f"{where}: a value does not fit {datatype}") from None


def _flatten(values: list):
    for v in values:
        if isinstance(v, list):
            yield from _flatten(v)
        else:
            yield v


def _from_bytes(raw: bytes, datatype: str, size: int, where: str) -> np.ndarray:
    """Raw little-endian bytes -> a flat array of `size` elements."""
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise InputError("bad_binary_data", f"{where}: BYTES data ends inside an element's length")
            (n,), pos = struct.unpack_from("<I", raw, pos), pos + 4
            if pos + n > len(raw):
                raise InputError("bad_binary_data", f"{where}: a BYTES element of {n} bytes runs past its data")
            items.append(raw[pos:pos + n])
            pos += n
        if len(items) != size:
            raise InputError("wrong_shape", f"{where}: binary data holds {len(items)} elements; the shape needs {size}")
        array = np.empty(size, dtype=object)
        array[:] = items
        return array
    dtype = DTYPES[datatype]
    if len(raw) != size * dtype.itemsize:
        raise InputError("wrong_shape", f"{where}: {len(raw)} bytes of binary data; the shape needs "
                         f"{size} x {dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype)


def _requested_outputs(outputs: object, binary_default: bool) -> list[RequestedOutput] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise InputError("wrong_type", '"outputs" must be a list of {"name"} objects')
    requested = []
    for i, spec in enumerate(outputs):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise InputError("wrong_type", f'outputs[{i}] must be an object with a "name" string')
        binary = _object(spec.get("parameters"), f"outputs[{i}].parameters").get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise InputError("wrong_type", f'outputs[{i}].parameters.binary_data must be true or false')
        requested.append(RequestedOutput(spec["name"], binary))
    return requested


def _request_id(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise InputError("wrong_type", f'"id" must be a string, not {_json_type(value)}')


def _object(value: object, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError("wrong_type", f'"{where}" must be an object, not {_json_type(value)}')
    return value


def encode_response(header: dict, outputs: list[tuple[str, str, np.ndarray, bool]]) -> tuple[bytes, int | None]:
    """The response body for `header` ({"model_name", "model_version", "id"?, "parameters"?}) and outputs
    (name, datatype, array, binary), and the JSON part's length when binary data follows it (else None)."""
    tensors, raw = [], []
    for name, datatype, array, binary in outputs:
        tensor = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            data = _to_bytes(array, datatype)
            tensor["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
        else:
            tensor["data"] = array.reshape(-1).tolist()
        tensors.append(tensor)
    body = json.dumps({**header, "outputs": tensors}, separators=(",", ":")).encode()
    if not raw:
        return body, None
    return body + b"".join(raw), len(body)


def _to_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(item)) + item for item in array.reshape(-1))
    return np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
