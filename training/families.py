"""The training side's family registry: everything that differs between the model families.

A family registers itself where it is defined, with `register_family(Family(...))` at the bottom of
its trainer module (training/train_prototypedl.py, training/train_protopnet.py; training/__init__.py
imports them), as
timm's `register_model` does; callers look it up with `family(name)` or `family_of(model)` and
nothing else branches on a family name. A row says how to build the model, which trainer and
evaluation run it, whether it trains under torchrun, what its ONNX graph returns (names, shapes,
the forward pass the exporter traces, the decoder graph if any), what its prototypes look like in a
bundle (pictures and provenance) and which config fields it checks. The torch-free counterpart, for
code that reads bundles, is bundle/families.py.

The trainers, the evaluation and the pictures import the family's model module, so a family's row
is registered by its trainer module (training/train_prototypedl.py, training/train_protopnet.py),
which imports them all: the row holds the objects themselves, with no import deferred.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from PIL import Image

from protoserve.errors import ProtoserveError
from protoserve.named_table import NamedTable

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
    """One family's row in the training registry (see the module docstring)."""
    name: str
    build: Callable[..., nn.Module]  # (model config, initial backbone weights?) -> model
    trainer: type  # its trainer class (constructor: config, out_dir, data_root)
    evaluate: Callable[..., dict]  # (model, data splits, batch_size) -> its figures
    distributed: bool  # trains under torchrun with DistributedDataParallel
    graph_outputs: Callable[[nn.Module], dict[str, list]]  # model.onnx output name -> shape, in graph order
    graph_forward: Callable[[nn.Module, torch.Tensor], tuple]  # image -> those outputs, as traced for export
    decoder: Callable[[nn.Module], nn.Module | None]  # latent -> image graph (decoder.onnx), or None
    prototype_records: Callable[..., list[PrototypeRecord]]  # (model, push_set, mean, std) -> one per prototype
    encode: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # images -> [N, P, D]: what prototypes are compared with
    backbone: Callable[[nn.Module], nn.Module]  # its feature extractor (the quality report's sanity check)
    config_checks: Callable[..., list[tuple[bool, str]]]  # (run config) -> (holds?, message) for its own fields
    pictures: Callable[..., list] | None  # (model, config, out, data_root, seed) -> PNGs of a checkpoint
    pictures_note: str = ""  # where its pictures come from instead, when `pictures` is None



class FamilyError(ProtoserveError):
    """A family that is unknown, or that lacks what was asked of it."""


FAMILIES: NamedTable[Family] = NamedTable("model family", FamilyError)


def register_family(entry: Family) -> Family:
    """Add a family to the registry; its module calls this once, where the family is defined."""
    return FAMILIES.register(entry.name, entry)


def family(name: str) -> Family:
    """The registry's row of a family name; FamilyError naming the known ones otherwise."""
    return FAMILIES.lookup(name)


def family_of(model: nn.Module) -> Family:
    """The row of a built model (its config names its family)."""
    return family(model.cfg.family)


def config_family(config) -> Family:
    """The row of the family a run config names."""
    return family(config.model.family)
