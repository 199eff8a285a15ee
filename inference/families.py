"""The torch-free side's family table: what a bundle of each family holds and how its answers read.

Each family is registered once in FAMILIES and looked up with `family(name)` (the manifest's
`family`); nothing else on the serving side branches on the family name. An entry says which
outputs model.onnx has and whether a decoder.onnx comes with it (the schema data the bundle
reader checks, bundle/manifest.py), what the last layer multiplies (so what a prototype contributes
to a logit), and which picture /explain adds: the decoder's reconstruction of the input, or a
heatmap per prototype of where it was found. The training side's counterpart is
training/families.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bundle.manifest import FAMILY_HAS_DECODER, FAMILY_OUTPUTS


@dataclass(frozen=True)
class Family:
    """One family's entry in the torch-free table (see the module docstring)."""
    name: str
    outputs: tuple[str, ...]  # outputs model.onnx must have (it may have more)
    has_decoder: bool  # a decoder.onnx: latent -> image
    logit_input: Literal["distance", "similarity"]  # what the last layer multiplies: logits = W x
    picture: Literal["reconstruction", "heatmap"]  # /explain: the input's reconstruction, or per-prototype heatmaps

    def contribution(self, weight, distance, similarity):
        """What a prototype adds to a class's logit: its weight times what the last layer multiplies.
        Scalars or arrays alike."""
        return weight * (distance if self.logit_input == "distance" else similarity)


def _entry(name: str, logit_input: str, picture: str) -> Family:
    return Family(name=name, outputs=tuple(FAMILY_OUTPUTS[name]), has_decoder=FAMILY_HAS_DECODER[name],
                  logit_input=logit_input, picture=picture)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    _entry("prototypedl", logit_input="distance", picture="reconstruction"),  # logits = W d (Li et al. 2018)
    _entry("protopnet", logit_input="similarity", picture="heatmap"),  # logits = W sim (Chen et al. 2019)
)}


def family(name: str) -> Family:
    """The table entry of a family name (a manifest's `family`)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})") from None
