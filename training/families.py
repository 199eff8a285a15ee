"""The training side's family table: everything that differs between PrototypeDL and ProtoPNet.

Each family is registered once in FAMILIES; callers look it up with `family(name)` or
`family_of(model)` and nothing else branches on the family name. An entry says how to build the
model, which trainer and evaluation run it, whether it trains under torchrun, what its ONNX graph
returns (names, shapes, the forward pass the exporter traces, the decoder graph if any) and what
its prototypes look like in a bundle (pictures and provenance). The torch-free counterpart, for
code that reads bundles, is bundle/families.py.

The trainers and the evaluation look the table up themselves (through training/checkpoint.py), so
the table names them as "module:attribute" and imports them when asked.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from PIL import Image

from protoserve.errors import ProtoserveError
from training.backbones import BACKBONES
from training.config import Config, ModelConfig
from training.data import Split
from training.protopnet import ProtoPNet
from training.prototypedl import PrototypeDL, class_identities
from training.push import object_overlaps, prototype_pictures

BATCH = "N"  # the dynamic batch axis of every exported tensor


@dataclass
class PrototypeRecord:
    """One prototype as a bundle shows it. pictures: kind -> picture, the first the prototype itself,
    the others referred to from its provenance as "<kind>_image"."""

    class_identity: int
    weights: list[float]  # its column of the last layer, K floats
    pictures: dict[str, Image.Image]
    provenance: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    """One family's entry in the training table (see the module docstring)."""
    name: str
    build: Callable[[ModelConfig, bool], nn.Module]  # (config, initial backbone weights?) -> model
    trainer: str  # "module:Class" of its trainer (constructor: config, out_dir, data_root)
    evaluate: str  # "module:function" (model, data splits, batch_size) -> its figures
    distributed: bool  # trains under torchrun with DistributedDataParallel
    graph_outputs: Callable[[nn.Module], dict[str, list]]  # model.onnx output name -> shape, in graph order
    graph_forward: Callable[[nn.Module, torch.Tensor], tuple]  # image -> those outputs, as traced for export
    decoder: Callable[[nn.Module], nn.Module | None]  # latent -> image graph (decoder.onnx), or None
    prototype_records: Callable[..., list[PrototypeRecord]]  # (model, push_set, mean, std) -> one per prototype
    encode: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # images -> [N, P, D]: what prototypes are compared with
    backbone: Callable[[nn.Module], nn.Module]  # its feature extractor (the quality report's sanity check)
    config_checks: Callable[[Config], list[tuple[bool, str]]]  # (holds?, message) for its own config fields
    pictures: str | None  # "module:function" (model, config, out, data_root, seed) -> PNGs of a checkpoint
    pictures_note: str = ""  # where its pictures come from instead, when `pictures` is None
    revision: str | None = None  # "module:attribute" of its revision hooks (training/revision_families.py)

    def trainer_class(self) -> type:
        """The family's trainer class (imported now)."""
        return _resolve(self.trainer)

    def evaluation(self) -> Callable[..., dict]:
        """The family's evaluation function (imported now)."""
        return _resolve(self.evaluate)

    def revision_hooks(self):
        """What interactive revision needs of the family (imported now): a RevisionFamily."""
        if self.revision is None:
            raise FamilyError(f"family {self.name!r} has no revision hooks")
        return _resolve(self.revision)

    def picture_function(self) -> Callable[..., list]:
        """The family's picture function (imported now; only when `pictures` is set)."""
        return _resolve(self.pictures)


class FamilyError(ProtoserveError):
    """A family that is unknown, or that lacks what was asked of it."""


def _resolve(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


# -- PrototypeDL ------------------------------------------------------------------------------------
def _prototypedl_outputs(model: PrototypeDL) -> dict[str, list]:
    c = model.cfg
    return {"logits": [BATCH, c.n_classes], "probabilities": [BATCH, c.n_classes],
            "distances": [BATCH, c.n_prototypes], "latent": [BATCH, model.latent_dim],
            "reconstruction": [BATCH, c.in_channels, c.input_size, c.input_size]}


def _prototypedl_forward(model: PrototypeDL, image: torch.Tensor) -> tuple:
    out = model(image)
    return out.logits, torch.softmax(out.logits, dim=1), out.distances, out.latent, out.reconstruction


class PrototypeDLDecoder(nn.Module):
    """decoder.onnx: latent [N, q] -> image [N, C, H, W]."""

    def __init__(self, model: PrototypeDL):
        super().__init__()
        self.model = model

    def forward(self, latent):
        return self.model.decode(latent)


@torch.no_grad()
def _prototypedl_records(model: PrototypeDL, push_set=None, mean=None, std=None) -> list[PrototypeRecord]:
    """Each prototype decoded to a picture; its class is that of its most negative weight."""
    pictures = model.decode(model.prototypes).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    W = model.last_layer.weight.detach()  # [K, m]
    identities = class_identities(W)
    return [PrototypeRecord(class_identity=identities[j], weights=W[:, j].tolist(),
                            pictures={"image": Image.fromarray(p[0] if p.shape[0] == 1 else p.transpose(1, 2, 0))})
            for j, p in enumerate(pictures)]  # p: [C, H, W]


# -- ProtoPNet --------------------------------------------------------------------------------------
def _protopnet_outputs(model: ProtoPNet) -> dict[str, list]:
    c, h = model.cfg, model.map_size
    return {"logits": [BATCH, c.n_classes], "probabilities": [BATCH, c.n_classes],
            "distances": [BATCH, c.n_prototypes], "similarity_maps": [BATCH, c.n_prototypes, h, h],
            "pooled_latent": [BATCH, c.prototype_dim]}


def _protopnet_forward(model: ProtoPNet, image: torch.Tensor) -> tuple:
    # Distances by subtraction: the expanded square of training loses small distances to float32
    # cancellation, and with it the parity of the similarities (log(1/d) near 0).
    out = model(image, exact=True)
    # pooled_latent: z averaged over positions, the input's place in the latent space for the
    # out-of-domain score (export/calibration.py)
    return out.logits, torch.softmax(out.logits, dim=1), out.distances, out.similarity_maps, out.latent.mean(dim=(2, 3))


class UnpushedPrototypes(FamilyError):
    """A ProtoPNet checkpoint whose prototypes were not all pushed onto training patches."""


@torch.no_grad()
def _protopnet_records(model: ProtoPNet, push_set: Split, mean=None, std=None) -> list[PrototypeRecord]:
    """Per pushed prototype: the patch, its source image with the receptive-field box (yellow) and the
    high-activation box (red), the activation map; the push provenance."""
    unpushed = (model.push_source[:, 0] < 0).nonzero().flatten().tolist()
    if unpushed:
        raise UnpushedPrototypes(f"prototypes {unpushed[:5]} were never pushed; export a checkpoint written "
                                 "after a push")
    W = model.last_layer.weight.detach()  # [K, M]
    identities = model.class_identities()
    overlaps = object_overlaps(model, push_set.images)  # None each without a segmentation mask
    records = []
    for j in range(model.prototypes.shape[0]):
        index, row, col = model.push_source[j].tolist()
        boxes = {name: dict(zip(("y0", "y1", "x0", "x1"), box[j].tolist(), strict=True))
                 for name, box in (("receptive_field_box", model.push_rf_box),
                                   ("activation_box", model.push_activation_box))}
        provenance = {"push_set": "train split (unaugmented)", "source_index": index,
                      "source_label": int(push_set.labels[index]), "patch": {"row": row, "col": col}, **boxes}
        if overlaps[j] is not None:  # the fraction of the activation box on the object (CUB masks)
            provenance["activation_box_on_object"] = overlaps[j]
        records.append(PrototypeRecord(class_identity=identities[j], weights=W[:, j].tolist(),
                                       pictures=prototype_pictures(model, j, push_set.images[index], mean, std),
                                       provenance=provenance))
    return records


def _protopnet_config_checks(config: Config) -> list[tuple[bool, str]]:
    m, s = config.model, config.schedule
    return [
        (m.backbone in BACKBONES, f"model.backbone must be one of {', '.join(BACKBONES)}"),
        (m.n_prototypes % m.n_classes == 0, "model.n_prototypes must be a multiple of n_classes (ProtoPNet)"),
        (m.prototype_dim > 0, "model.prototype_dim must be > 0"),
        (s.warm_epochs >= 0 and s.push_start > 0 and s.push_every > 0 and s.last_layer_epochs >= 0,
         "schedule: warm_epochs and last_layer_epochs must be >= 0, push_start and push_every > 0"),
        (s.lr_step_epochs > 0 and 0 < s.lr_gamma <= 1, "schedule.lr_step_epochs must be > 0, lr_gamma in (0, 1]"),
    ]


def _build_protopnet(config: ModelConfig, initial_weights: bool = True) -> ProtoPNet:
    return ProtoPNet(config, backbone_weights=config.backbone_weights if initial_weights else None)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(name="prototypedl", build=lambda config, initial_weights=True: PrototypeDL(config),
           trainer="training.train:Trainer", evaluate="training.evaluate:evaluate_prototypedl",
           distributed=False, graph_outputs=_prototypedl_outputs, graph_forward=_prototypedl_forward,
           encode=lambda model, x: model.encode(x)[:, None, :], backbone=lambda model: model.encoder,
           decoder=PrototypeDLDecoder, prototype_records=_prototypedl_records, config_checks=lambda config: [],
           pictures="training.visualize:prototypedl_figures",
           revision="training.revision_families:PROTOTYPEDL_REVISION"),
    Family(name="protopnet", build=_build_protopnet,
           trainer="training.train_protopnet:ProtoPNetTrainer", evaluate="training.evaluate:evaluate_protopnet",
           distributed=True, graph_outputs=_protopnet_outputs, graph_forward=_protopnet_forward,
           encode=lambda model, x: model.latent(x).flatten(2).transpose(1, 2), backbone=lambda model: model.features,
           decoder=lambda model: None, prototype_records=_protopnet_records, config_checks=_protopnet_config_checks,
           pictures=None, pictures_note="push writes each prototype's pictures into the run's push/epoch_NNNN/ "
                                       "folders, and the bundle holds those of the exported model",
           revision="training.revision_families:PROTOPNET_REVISION"),
)}


def family(name: str) -> Family:
    """The table entry of a family name; FamilyError naming the known ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise FamilyError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})") from None


def family_of(model: nn.Module) -> Family:
    """The entry of a built model (its config names its family)."""
    return family(model.cfg.family)


def config_family(config: Config) -> Family:
    """The entry of the family a run config names."""
    return family(config.model.family)
