"""An ONNX model restricted to some of its outputs, read and written without the onnx package.

ONNX Runtime runs every node of a graph on every call, whatever outputs the caller asks for: PrototypeDL's
model.onnx computes its decoder's reconstruction on each /predict run, which only /explain shows. The
service opens a second session on the graph cut down to the nodes its classify call needs
(inference/model.py). The cut is done on the protobuf wire format (ModelProto -> GraphProto -> NodeProto,
fields as onnx.proto numbers them): the service side does not install the onnx package, whose import
alone costs a worker ~15 MB. The kept nodes, initializers and every other field are copied byte for
byte; a graph with control flow (subgraphs that may read outer names) is left whole.
"""

from __future__ import annotations

MODEL_GRAPH = 7  # ModelProto.graph
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_OUTPUT = 1, 5, 12  # GraphProto fields
NODE_INPUT, NODE_OUTPUT, NODE_OP_TYPE = 1, 2, 4  # NodeProto fields
VALUE_INFO_NAME, TENSOR_NAME = 1, 8  # ValueInfoProto.name, TensorProto.name
CONTROL_FLOW = {"If", "Loop", "Scan"}
LEN = 2  # the length-delimited wire type


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def fields(data: bytes) -> list[tuple[int, bytes | None, bytes]]:
    """(field number, payload of a length-delimited field else None, the field's raw bytes) in order."""
    out, i = [], 0
    while i < len(data):
        start = i
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        payload = None
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == LEN:
            size, i = _varint(data, i)
            payload, i = data[i:i + size], i + size
        else:
            raise ValueError(f"protobuf wire type {wire} (groups) is not used by ONNX")
        out.append((number, payload, data[start:i]))
    return out


def _field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | LEN) + _encode_varint(len(payload)) + payload


def _strings(message: bytes, number: int) -> list[str]:
    return [p.decode() for n, p, _ in fields(message) if n == number and p is not None]


def restrict_outputs(model: bytes, outputs: list[str]) -> bytes | None:
    """The serialized model with only `outputs` and the nodes and initializers they depend on; None when
    the graph cannot be cut safely (control flow, a missing output)."""
    parts = fields(model)
    graphs = [p for n, p, _ in parts if n == MODEL_GRAPH]
    if len(graphs) != 1:
        return None
    graph = _restrict_graph(graphs[0], outputs)
    if graph is None:
        return None
    return b"".join(_field(MODEL_GRAPH, graph) if n == MODEL_GRAPH else raw for n, _, raw in parts)


def _restrict_graph(graph: bytes, outputs: list[str]) -> bytes | None:
    parts = fields(graph)
    declared = [_strings(p, VALUE_INFO_NAME)[0] for n, p, _ in parts if n == GRAPH_OUTPUT]
    if not set(outputs) <= set(declared):
        return None
    needed, kept_nodes = set(outputs), set()
    nodes = [(k, p) for k, (n, p, _) in enumerate(parts) if n == GRAPH_NODE]
    for k, node in reversed(nodes):  # ONNX nodes are in topological order
        if set(_strings(node, NODE_OP_TYPE)) & CONTROL_FLOW:
            return None
        if needed & set(_strings(node, NODE_OUTPUT)):
            kept_nodes.add(k)
            needed |= set(_strings(node, NODE_INPUT))
    kept = []
    for k, (n, p, raw) in enumerate(parts):
        if n == GRAPH_NODE and k not in kept_nodes:
            continue
        if n == GRAPH_OUTPUT and _strings(p, VALUE_INFO_NAME)[0] not in outputs:
            continue
        if n == GRAPH_INITIALIZER and _strings(p, TENSOR_NAME)[:1] and _strings(p, TENSOR_NAME)[0] not in needed:
            continue
        kept.append(raw)
    return b"".join(kept)
