"""PyTorch -> ONNX: a family's classifier graph (prototype layer inside) and its decoder graph, if any.

What each family's model.onnx returns (names, shapes, the traced forward pass) and whether it has a
decoder.onnx comes from the family table (training/families.py); the names and their meaning are
the bundle's contract (../shared/ARCHITECTURE.md "ONNX names"). ProtoPNet's distances are a minimum
over positions, computed as a max-pool with a fixed kernel, so the batch axis stays dynamic.

The prototype vectors stay one initializer of model.onnx (PROTOTYPE_INITIALIZER), and the
squared distances are computed from it inside the graph: nothing is precomputed outside.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
import torch.nn as nn
from onnx import numpy_helper

from bundle.manifest import GraphSpec, TensorSpec
from training.families import BATCH, family_of

OPSET = 17
PROTOTYPE_INITIALIZER = "model.prototypes"  # the wrapper's attribute `model` + the parameter name


class ClassifierGraph(nn.Module):
    """The classifier as the ONNX graph sees it: the family's export forward (softmax included)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.forward_outputs = family_of(model).graph_forward

    def forward(self, image):  # [N, C, H, W] -> the outputs of classifier_outputs(model), in order
        return self.forward_outputs(self.model, image)


def classifier_graph(model: nn.Module) -> nn.Module:
    """The module torch.onnx traces into model.onnx."""
    return ClassifierGraph(model)


def classifier_outputs(model: nn.Module) -> list[str]:
    """model.onnx's output names, in graph order."""
    return list(family_of(model).graph_outputs(model))


def decoder_graph(model: nn.Module) -> nn.Module | None:
    """The family's latent -> image graph (decoder.onnx), or None when it has none."""
    return family_of(model).decoder(model)


def classifier_spec(model: nn.Module, file: str = "model.onnx") -> GraphSpec:
    """model.onnx's names and shapes: image [N, C, H, W] in, the family's outputs out."""
    c = model.cfg
    image = [BATCH, c.in_channels, c.input_size, c.input_size]
    outputs = family_of(model).graph_outputs(model)
    return GraphSpec(file=file, opset=OPSET, inputs=[TensorSpec(name="image", shape=image)],
                     outputs=[TensorSpec(name=n, shape=shape) for n, shape in outputs.items()],
                     prototype_initializer=PROTOTYPE_INITIALIZER)


def decoder_spec(model: nn.Module, file: str = "decoder.onnx") -> GraphSpec:
    """decoder.onnx: latent [N, q] -> reconstruction [N, C, H, W] (model.latent_dim is q)."""
    c = model.cfg
    return GraphSpec(file=file, opset=OPSET, inputs=[TensorSpec(name="latent", shape=[BATCH, model.latent_dim])],
                     outputs=[TensorSpec(name="reconstruction",
                                         shape=[BATCH, c.in_channels, c.input_size, c.input_size])])


def export_graph(module: nn.Module, spec: GraphSpec, path: Path) -> None:
    """Trace `module` into `path` with the names and shapes of `spec`, weights inside the file.

    Exporter: the TorchScript one (dynamo=False), chosen on purpose although torch 2.14 defaults
    to the dynamo exporter. These graphs are small and static (no data-dependent control flow),
    so tracing captures them exactly; with constant folding off, every parameter stays an
    initializer under its state_dict name, so the prototype vectors are `model.prototypes`
    [m, q] in the file, where the dynamo exporter's optimiser folds them into an anonymous
    constant (and is slower; README "Measured choices"). ONNX Runtime folds constants itself when it loads
    the graph, so nothing is lost.
    """
    module.eval()
    example = tuple(torch.rand(2, *t.shape[1:]) for t in spec.inputs)  # batch 2: the axis is dynamic
    names = [t.name for t in spec.inputs + spec.outputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy-exporter notice, see above
        torch.onnx.export(module, example, str(path), dynamo=False, opset_version=spec.opset,
                          input_names=[t.name for t in spec.inputs],
                          output_names=[t.name for t in spec.outputs],
                          dynamic_axes={n: {0: BATCH} for n in names},
                          do_constant_folding=False, external_data=False)
    _set_output_shapes(path, spec)


def _set_output_shapes(path: Path, spec: GraphSpec) -> None:
    """Write the spec's static shapes into the graph outputs (tracing leaves some axes anonymous)."""
    proto = onnx.load(str(path))
    shapes = {t.name: t.shape for t in spec.inputs + spec.outputs}
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, shapes[value.name], strict=True):
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def prototype_vectors(path: Path, initializer: str = PROTOTYPE_INITIALIZER):
    """The prototype matrix [m, q] as stored in an ONNX file (numpy)."""
    proto = onnx.load(str(path))
    for init in proto.graph.initializer:
        if init.name == initializer:
            return numpy_helper.to_array(init)
    raise KeyError(f"{path}: no initializer named {initializer!r}")


def replace_initializer(path: Path, out: Path, name: str, value) -> None:
    """Copy an ONNX file with one initializer overwritten by `value` (same shape)."""
    proto = onnx.load(str(path))
    for i, init in enumerate(proto.graph.initializer):
        if init.name == name:
            if tuple(init.dims) != tuple(value.shape):
                raise ValueError(f"{name}: shape {tuple(value.shape)}, the graph holds {tuple(init.dims)}")
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            onnx.save(proto, str(out))
            return
    raise KeyError(f"{path}: no initializer named {name!r}")
