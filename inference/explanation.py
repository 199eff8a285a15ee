"""One image's explanation (the /explain answer) from the graph's outputs, and its picture.

One definition for every surface that explains: the service's /explain, `protoserve explain` and the
pictures of `protoserve score --pictures`. The service adds only what is HTTP's (metrics, headers).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bundle.families import family
from bundle.manifest import Bundle, DomainCalibration, Manifest
from inference.domain import abstention, domain_rule
from inference.explain import (
    heatmap_overlay,
    nearest_prototypes,
    pixels_to_picture,
    png_base64,
    predictions,
    prototype_rows,
)
from inference.figure import explanation_figure
from inference.model import LoadedModel
from inference.preprocess import denormalize


@dataclass(frozen=True)
class PrototypePictures:
    """A bundle's prototype pictures as base64 PNG, read once: each prototype's picture (None without
    one) and, for ProtoPNet, the training image it was pushed onto, with the patch's box."""

    images: dict[int, str | None] = field(default_factory=dict)
    sources: dict[int, str] = field(default_factory=dict)


def prototype_pictures(bundle: Bundle) -> PrototypePictures:
    """The bundle's prototype pictures (its files read once)."""
    rows = bundle.manifest.prototypes
    images = {row.id: _base64_file(bundle.file(row.image)) if row.image else None for row in rows}
    sources = {row.id: _base64_file(bundle.file(row.provenance["source_image"]))
               for row in rows if (row.provenance or {}).get("source_image")}
    return PrototypePictures(images, sources)


def _base64_file(path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def judge_answer(answer: dict, in_domain: bool | None, typicality: float | None,
                 calibration: DomainCalibration | None, abstain: bool) -> dict:
    """Add in_domain, typicality and abstained to a prediction; with `abstain`, an out-of-domain one
    withholds its label and says why (inference/domain.py). None: the bundle has no calibration."""
    if in_domain is None:
        answer.update(in_domain=None, typicality=None, abstained=False)
        return answer
    answer.update(in_domain=bool(in_domain), typicality=round(float(typicality), 6), abstained=False)
    if abstain and not in_domain:
        abstention(answer, calibration)
    return answer


def explanation(manifest: Manifest, active: np.ndarray, outputs: dict[str, np.ndarray], x: np.ndarray,
                top_k: int, prediction: dict, pictures: PrototypePictures, model: dict) -> dict:
    """The /explain answer for one image: `outputs` are model.onnx's for it (no batch axis), `x` its model
    input [C, H, W], `prediction` its judged prediction (judge_answer); the top_k nearest active
    prototypes, nearest first, with their pictures, and the family's picture of the input. Weights and
    contributions are those of the class the model names, also when the answer abstained."""
    distances = outputs["distances"]
    label = int(np.argmax(outputs["probabilities"]))
    nearest = nearest_prototypes(distances, top_k, active)
    rows = prototype_rows(manifest, distances, nearest, label)
    for row in rows:
        row["image"] = pictures.images.get(row["id"])
    answer = {"model": model, "prediction": prediction, "prototypes": rows}
    if family(manifest.family).picture == "heatmap":  # where in the input each prototype was found
        pixels = denormalize(x, manifest.input)
        for row, j in zip(rows, nearest, strict=True):
            row["heatmap"] = png_base64(heatmap_overlay(outputs["similarity_maps"][j], pixels))
            row["source_image"] = pictures.sources.get(row["id"])
    else:  # "reconstruction": the decoder's picture of the input
        answer["reconstruction"] = png_base64(pixels_to_picture(denormalize(outputs["reconstruction"],
                                                                            manifest.input)))
    return answer


def explanation_picture(answer: dict, x: np.ndarray, manifest: Manifest) -> Image.Image:
    """The explanation as one picture (inference/figure.py), the input shown as the model saw it."""
    return explanation_figure(answer, pixels_to_picture(denormalize(x, manifest.input)))


class Explainer:
    """/explain without a server (`protoserve explain`): a loaded, verified bundle (inference/model.py)
    answers for one model input at a time, as the service does."""

    def __init__(self, model: LoadedModel):
        self.model, self.manifest = model, model.bundle.manifest
        self.pictures = prototype_pictures(model.bundle)
        self.domain = domain_rule(self.manifest, model.active)
        self.ref = {"name": self.manifest.name, "version": self.manifest.version}

    def explain(self, x: np.ndarray, top_k: int, abstain: bool = False) -> dict:
        """Model input [C, H, W] -> the /explain answer (the same numbers and fields as the service's)."""
        outputs = {name: value[0] for name, value in self.model.outputs(x[None].astype(np.float32)).items()}
        probabilities, distances = outputs["probabilities"][None], outputs["distances"][None]
        prediction = predictions(probabilities, self.manifest.class_names)[0]
        in_domain = typicality = None
        if self.domain is not None:
            features = outputs[self.domain.features][None] if self.domain.features else None
            judged = self.domain.judge(distances, probabilities.argmax(axis=1), features,
                                       flat=self.domain.flat(x[None]))
            in_domain, typicality = bool(judged[0][0]), float(judged[1][0])
        judge_answer(prediction, in_domain, typicality, self.manifest.domain, abstain)
        return explanation(self.manifest, self.model.active, outputs, x, top_k, prediction, self.pictures, self.ref)
