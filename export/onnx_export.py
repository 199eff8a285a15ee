"""PyTorch -> ONNX: the classifier graph of each family (prototype layer inside) and PrototypeDL's decoder.

PrototypeDL
model.onnx   image [N, C, H, W] -> logits [N, K], probabilities [N, K], distances [N, m],
             latent [N, q], reconstruction [N, C, H, W]
decoder.onnx latent [N, q] -> reconstruction [N, C, H, W]
ProtoPNet
model.onnx   image [N, C, H, W] -> logits [N, K], probabilities [N, K], distances [N, M] (minimum over
             positions), similarity_maps [N, M, h, w]; the minimum is a max-pool with a fixed kernel,
             so the batch axis stays dynamic

The prototype vectors stay one initializer of model.onnx (PROTOTYPE_INITIALIZER), and the
squared distances are computed from it inside the graph: nothing is precomputed outside.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
import torch.nn as nn

from export.bundle import FAMILY_OUTPUTS, GraphSpec, TensorSpec
from training.protopnet import ProtoPNet
from training.prototypedl import PrototypeDL

OPSET = 17
BATCH = "N"
PROTOTYPE_INITIALIZER = "model.prototypes"  # the wrapper's attribute `model` + the parameter name
CLASSIFIER_OUTPUTS = ["logits", "probabilities", "distances", "latent", "reconstruction"]


class PrototypeDLGraph(nn.Module):
    """The classifier as the ONNX graph sees it: the model's own forward, softmax added."""

    def __init__(self, model: PrototypeDL):
        super().__init__()
        self.model = model

    def forward(self, image):  # [N, C, H, W]
        out = self.model(image)
        return out.logits, torch.softmax(out.logits, dim=1), out.distances, out.latent, out.reconstruction


class ProtoPNetGraph(nn.Module):
    """ProtoPNet as the ONNX graph sees it: the model's own forward, softmax added."""

    def __init__(self, model: ProtoPNet):
        super().__init__()
        self.model = model

    def forward(self, image):  # [N, C, H, W]
        # Distances by subtraction: the expanded square of training loses small distances to
        # float32 cancellation, and with it the parity of the similarities (log(1/d) near 0).
        out = self.model(image, exact=True)
        return out.logits, torch.softmax(out.logits, dim=1), out.distances, out.similarity_maps


def classifier_graph(model: PrototypeDL | ProtoPNet) -> nn.Module:
    return ProtoPNetGraph(model) if isinstance(model, ProtoPNet) else PrototypeDLGraph(model)


def classifier_outputs(model: PrototypeDL | ProtoPNet) -> list[str]:
    return FAMILY_OUTPUTS[model.cfg.family]


class DecoderGraph(nn.Module):
    def __init__(self, model: PrototypeDL):
        super().__init__()
        self.model = model

    def forward(self, latent):  # [N, q] -> [N, C, H, W]
        return self.model.decode(latent)


def classifier_spec(model: PrototypeDL | ProtoPNet, file: str = "model.onnx") -> GraphSpec:
    if isinstance(model, ProtoPNet):
        return protopnet_spec(model, file)
    c = model.cfg
    image = [BATCH, c.in_channels, c.input_size, c.input_size]
    shapes = {
        "logits": [BATCH, c.n_classes],
        "probabilities": [BATCH, c.n_classes],
        "distances": [BATCH, c.n_prototypes],
        "latent": [BATCH, model.latent_dim],
        "reconstruction": image,
    }
    return GraphSpec(file=file, opset=OPSET, inputs=[TensorSpec(name="image", shape=image)],
                     outputs=[TensorSpec(name=n, shape=shapes[n]) for n in CLASSIFIER_OUTPUTS],
                     prototype_initializer=PROTOTYPE_INITIALIZER)


def protopnet_spec(model: ProtoPNet, file: str = "model.onnx") -> GraphSpec:
    c, h = model.cfg, model.map_size
    shapes = {
        "logits": [BATCH, c.n_classes],
        "probabilities": [BATCH, c.n_classes],
        "distances": [BATCH, c.n_prototypes],
        "similarity_maps": [BATCH, c.n_prototypes, h, h],
    }
    image = [BATCH, c.in_channels, c.input_size, c.input_size]
    return GraphSpec(file=file, opset=OPSET, inputs=[TensorSpec(name="image", shape=image)],
                     outputs=[TensorSpec(name=n, shape=shapes[n]) for n in FAMILY_OUTPUTS["protopnet"]],
                     prototype_initializer=PROTOTYPE_INITIALIZER)


def decoder_spec(model: PrototypeDL, file: str = "decoder.onnx") -> GraphSpec:
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
    [m, q] in the file. The dynamo exporter's optimiser folds them into an anonymous
    `unsqueeze_1` [1, m, q] constant (measured with torch 2.14.1), and takes ~4 s against
    ~0.4 s. ONNX Runtime folds constants itself when it loads the graph, so nothing is lost.
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
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    for init in proto.graph.initializer:
        if init.name == initializer:
            return numpy_helper.to_array(init)
    raise KeyError(f"{path}: no initializer named {initializer!r}")


def replace_initializer(path: Path, out: Path, name: str, value) -> None:
    """Copy an ONNX file with one initializer overwritten by `value` (same shape)."""
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    for i, init in enumerate(proto.graph.initializer):
        if init.name == name:
            if tuple(init.dims) != tuple(value.shape):
                raise ValueError(f"{name}: shape {tuple(value.shape)}, the graph holds {tuple(init.dims)}")
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, name))
            onnx.save(proto, str(out))
            return
    raise KeyError(f"{path}: no initializer named {name!r}")
