"""Knowing when not to answer: how far an input is from every case the model knows, from its
distances to the prototypes, judged against the bundle's calibration (manifest `domain`).

Scores (larger = less like the validation images), from the distances [N, M] to the prototypes:
    nearest_distance         the distance to the nearest active prototype
    class_nearest_distance   the distance to the nearest active prototype of the predicted class
    mean3_distance           the mean distance to the three nearest active prototypes
    prototype_mahalanobis    how unusual the whole profile of L2 distances (sqrt of each squared
                             distance) is for the predicted class: (z - mean_label)' P (z - mean_label),
                             with class means and a shared precision P fitted on validation images
    nearest_and_mahalanobis  both at once (Fisher's method): -log p_nearest - log p_mahalanobis, each p
                             the share of validation images scoring higher on that part
An input is in domain when its score is at most the calibrated threshold (chosen for a stated
false-alarm rate on the validation split); its typicality is the share of validation images that
scored higher (1: as typical as they come, 0: beyond every validation image).

Abstention (the request option "abstain", or PROTOSERVE_ABSTAIN=1 for every request): an
out-of-domain answer withholds its label and says why; the nearest prototypes are still shown.
A bundle without calibration (exported before it existed) answers in_domain and typicality null
and never abstains: the service cannot say, so it does not pretend to.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from export.bundle import DomainCalibration, Manifest
from inference.explain import nearest_distance
from protoserve.domain_scores import distance_scores, fisher, mahalanobis, upper_tail
from protoserve.errors import InputError

ABSTAIN_ENV = "PROTOSERVE_ABSTAIN"
ABSTAIN_REASON = "out_of_domain"


@dataclass(frozen=True)
class DomainRule:
    """One bundle's calibrated rule, ready for a batch at a time (vectorised, no per-image Python)."""

    calibration: DomainCalibration
    active: np.ndarray  # [M] bool
    class_of: np.ndarray  # [M] the class each prototype stands for
    quantiles: np.ndarray
    levels: np.ndarray
    class_means: np.ndarray | None = None  # the Mahalanobis scores only
    precision: np.ndarray | None = None
    components: dict[str, np.ndarray] | None = None  # nearest_and_mahalanobis only

    def score(self, distances: np.ndarray, labels: np.ndarray) -> np.ndarray:
        name = self.calibration.score
        if name == "prototype_mahalanobis":
            return mahalanobis(distances, labels, self.class_means, self.precision)
        if name == "nearest_and_mahalanobis":
            nearest = nearest_distance(distances, self.active)
            far = mahalanobis(distances, labels, self.class_means, self.precision)
            return fisher([upper_tail(nearest, self.components["nearest_distance"], self.levels),
                           upper_tail(far, self.components["prototype_mahalanobis"], self.levels)])
        if name == "nearest_distance":
            return nearest_distance(distances, self.active)
        return distance_scores(distances, labels, self.active, self.class_of)[name]

    def judge(self, distances: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[N, M] distances and [N] predicted labels -> (in_domain [N] bool, typicality [N] float)."""
        scores = self.score(distances, labels)
        return scores <= self.calibration.threshold, upper_tail(scores, self.quantiles, self.levels)


def domain_rule(manifest: Manifest, active: np.ndarray) -> DomainRule | None:
    """The bundle's rule, or None when its manifest has no calibration."""
    c = manifest.domain
    if c is None:
        return None
    class_of = np.array([row.class_identity for row in manifest.prototypes], dtype=np.int64)
    fitted = {}
    if c.class_means is not None:
        fitted = {"class_means": np.asarray(c.class_means, np.float64),
                  "precision": np.asarray(c.precision, np.float64)}
    if c.components is not None:
        fitted["components"] = {name: np.asarray(q, np.float64) for name, q in c.components.items()}
    return DomainRule(c, active, class_of, np.asarray(c.quantiles, np.float64), np.asarray(c.levels, np.float64),
                      **fitted)


def abstain_default() -> bool:
    """The service setting: PROTOSERVE_ABSTAIN=1 makes every out-of-domain answer an abstention."""
    return os.environ.get(ABSTAIN_ENV, "0") == "1"


def parse_flag(value: object, name: str, default: bool) -> bool:
    """A request's boolean option (JSON true/false, or "true"/"false"/"1"/"0" from a form field)."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise InputError("wrong_type", f'"{name}" must be true or false, not {value!r}')


def domain_fields(in_domain: np.ndarray | None, typicality: np.ndarray | None, i: int) -> dict:
    """The answer's fields for image i: in_domain and typicality (null without calibration)."""
    if in_domain is None:
        return {"in_domain": None, "typicality": None}
    return {"in_domain": bool(in_domain[i]), "typicality": round(float(typicality[i]), 6)}


def abstention(answer: dict, calibration: DomainCalibration) -> dict:
    """Withhold an out-of-domain prediction's label (answer = {"label", "class_name", ...}) and say why."""
    answer.update(label=None, class_name=None, abstained=True, reason=ABSTAIN_REASON,
                  detail=f"unlike the model's validation images: typicality {answer['typicality']:.4g}, below "
                         f"the {calibration.false_alarm_rate:g} false-alarm threshold of its "
                         f"{calibration.score.replace('_', ' ')}")
    return answer
