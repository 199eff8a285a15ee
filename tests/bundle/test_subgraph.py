"""bundle/subgraph.py: a model cut to some outputs computes them as the whole graph does, with fewer nodes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from bundle.manifest import read_bundle
from bundle.runtime import load_probe, session_options
from bundle.subgraph import restrict_outputs
from inference.model import REPO

BUNDLE = REPO / "models" / "prototypedl_mnist" / "bundle"


def session(model: bytes):
    return ort.InferenceSession(model, session_options(1, "all"), providers=["CPUExecutionProvider"])


def test_the_cut_graph_gives_the_same_numbers_without_the_decoder():
    bundle = read_bundle(BUNDLE)
    whole = bundle.model_path.read_bytes()
    outputs = ["probabilities", "distances", "latent"]
    cut = restrict_outputs(whole, outputs)
    assert cut is not None
    kept, full = onnx.load_from_string(cut), onnx.load_from_string(whole)
    assert [o.name for o in kept.graph.output] == outputs
    assert len(kept.graph.node) < len(full.graph.node)
    assert len(kept.graph.initializer) < len(full.graph.initializer)  # the decoder's weights are gone
    assert kept.opset_import == full.opset_import and kept.ir_version == full.ir_version
    onnx.checker.check_model(kept)
    images = load_probe(bundle)["input.image"].astype(np.float32)
    for a, b in zip(session(whole).run(outputs, {"image": images}), session(cut).run(outputs, {"image": images}),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_unknown_output_or_control_flow_leaves_the_graph_whole():
    whole = (BUNDLE / "model.onnx").read_bytes()
    assert restrict_outputs(whole, ["probabilities", "no_such_output"]) is None
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "branch", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    graph = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)], "g",
                              [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    assert restrict_outputs(helper.make_model(graph).SerializeToString(), ["y"]) is None
