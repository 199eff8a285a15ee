"""The Open Inference Protocol's tensors (service/tensors.py): JSON and binary bodies in, bodies out."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from protoserve.errors import InputError
from service.tensors import encode_response, parse_request


def binary_body(header: dict, *raw: bytes) -> tuple[bytes, str]:
    text = json.dumps(header).encode()
    return text + b"".join(raw), str(len(text))


def test_json_tensors_flat_or_nested_and_requested_outputs():
    values = np.arange(12, dtype=np.float32).reshape(1, 3, 4) / 12
    for data in (values.reshape(-1).tolist(), values.tolist()):
        body = {"id": "a", "parameters": {"top_k": 2}, "inputs": [{"name": "image", "datatype": "FP32",
                                                                   "shape": [1, 3, 4], "data": data}],
                "outputs": [{"name": "label"}, {"name": "probabilities", "parameters": {"binary_data": True}}]}
        request = parse_request(json.dumps(body).encode(), None)
        assert request.id == "a" and request.parameters == {"top_k": 2}
        assert request.inputs[0].data.dtype == np.float32 and np.array_equal(request.inputs[0].data, values)
        assert [(o.name, o.binary) for o in request.outputs] == [("label", False), ("probabilities", True)]


def test_binary_tensors_fp32_and_bytes():
    values = np.linspace(0, 1, 8, dtype=np.float32).reshape(2, 4)
    files = [b"\x89PNG first", b"second"]
    packed = b"".join(struct.pack("<I", len(f)) + f for f in files)
    header = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [2, 4],
                          "parameters": {"binary_data_size": values.nbytes}},
                         {"name": "image_bytes", "datatype": "BYTES", "shape": [2],
                          "parameters": {"binary_data_size": len(packed)}}],
              "parameters": {"binary_data_output": True}}
    request = parse_request(*binary_body(header, values.tobytes(), packed))
    assert np.array_equal(request.inputs[0].data, values)
    assert list(request.inputs[1].data) == files
    assert request.outputs is None and request.binary_output


@pytest.mark.parametrize("body, length, reason", [
    (b"not json", None, "invalid_json"),
    (b"[]", None, "wrong_type"),
    (b"{}", None, "missing_field"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "FP16", "shape": [1], "data": [1]}]}).encode(), None,
     "wrong_type"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [2], "data": [1.0]}]}).encode(), None,
     "wrong_shape"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": ["x"]}]}).encode(), None,
     "wrong_type"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [-1], "data": []}]}).encode(), None,
     "wrong_shape"),
    (json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1]}]}).encode(), None, "missing_field"),
    (*binary_body({"inputs": [{"name": "i", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}]},
                  b"\0" * 4), "bad_binary_data"),
    (*binary_body({"inputs": [{"name": "i", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]},
                  b"\0" * 8), "bad_binary_data"),
    (*binary_body({"inputs": [{"name": "i", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}}]},
                  b"\0" * 4), "wrong_shape"),
    (b"{}", "99", "bad_binary_data"),
    (json.dumps({"inputs": [{"name": "i", "datatype": "FP32", "shape": [1], "data": [1.0]}],
                 "outputs": [{"name": "label", "parameters": {"binary_data": "yes"}}]}).encode(), None, "wrong_type"),
])
def test_refusals_name_the_problem(body, length, reason):
    with pytest.raises(InputError) as e:
        parse_request(body, length)
    assert e.value.reason == reason and e.value.status == 400


def test_bytes_elements_that_run_past_their_data_are_refused():
    header = {"inputs": [{"name": "b", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}]}
    with pytest.raises(InputError) as e:
        parse_request(*binary_body(header, struct.pack("<I", 10) + b"ab"))
    assert e.value.reason == "bad_binary_data"


def test_response_json_and_binary():
    probabilities = np.array([[0.25, 0.75]], dtype=np.float32)
    labels = np.array([1], dtype=np.int64)
    flags = np.array([True])
    outputs = [("probabilities", "FP32", probabilities, False), ("label", "INT64", labels, True),
               ("in_domain", "BOOL", flags, True)]
    body, length = encode_response({"model_name": "m", "model_version": "1"}, outputs)
    header = json.loads(body[:length])
    assert header["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]}
    assert header["outputs"][1]["parameters"] == {"binary_data_size": 8}
    assert body[length:] == labels.tobytes() + b"\x01"
    plain, none = encode_response({"model_name": "m"}, [("label", "INT64", labels, False)])
    assert none is None and json.loads(plain)["outputs"][0]["data"] == [1]
