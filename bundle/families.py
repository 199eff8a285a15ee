"""The serving side's family registry: what a bundle of each family holds and how its answers read.

A family registers itself once here with `register_family`; the bundle schema (bundle/manifest.py)
reads the family names, outputs and decoder from this registry, and the serving side (inference/,
service/, scoring/) looks families up with `family(name)` (the manifest's `family`). Nothing else
on the serving side branches on a family name. A row says which outputs model.onnx must have,
whether a decoder.onnx comes with it, which output is the input's place in the latent space (the
out-of-domain features), what the last layer multiplies (so what a prototype contributes to a
logit), which picture /explain adds, and whether its prototypes are pushed onto training patches.
The training side's registry is training/families.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from protoserve.named_table import NamedTable


@dataclass(frozen=True)
class Family:
    """One family's row in the serving-side registry (see the module docstring)."""
    name: str
    outputs: tuple[str, ...]  # outputs model.onnx must have (it may have more); all with a leading batch axis N
    has_decoder: bool  # a decoder.onnx: latent -> image
    # The model.onnx output ([N, D]) the out-of-domain score reads as the input's place in the latent
    # space. Optional in a bundle: one without it is scored from its distances alone.
    domain_features: str
    logit_input: Literal["distance", "similarity"]  # what the last layer multiplies: logits = W x
    picture: Literal["reconstruction", "heatmap"]  # /explain: the input's reconstruction, or per-prototype heatmaps
    # Each prototype is a training patch of its class (push): a revision's training images must hold an
    # example of every class a prototype stands for.
    pushed: bool = False

    def contribution(self, weight, distance, similarity):
        """What a prototype adds to a class's logit: its weight times what the last layer multiplies.
        Scalars or arrays alike."""
        return weight * (distance if self.logit_input == "distance" else similarity)


FAMILIES: NamedTable[Family] = NamedTable("model family")


def register_family(entry: Family) -> Family:
    """Add a family to the registry (once per name)."""
    return FAMILIES.register(entry.name, entry)


def family(name: str) -> Family:
    """The registry's row of a family name (a manifest's `family`)."""
    return FAMILIES.lookup(name)


def domain_feature_outputs() -> set[str]:
    """The names of every family's out-of-domain features output."""
    return {f.domain_features for f in FAMILIES.values()}


# logits = W d (Li et al. 2018)
register_family(Family(name="prototypedl", outputs=("logits", "probabilities", "distances", "latent", "reconstruction"),
                       has_decoder=True, domain_features="latent", logit_input="distance", picture="reconstruction"))
# logits = W sim (Chen et al. 2019)
register_family(Family(name="protopnet", outputs=("logits", "probabilities", "distances", "similarity_maps"),
                       has_decoder=False, domain_features="pooled_latent", logit_input="similarity",
                       picture="heatmap", pushed=True))
