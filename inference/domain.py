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
    latent_mahalanobis       how unusual the input's place in the latent space (the model.onnx output
                             the calibration names in `features`: PrototypeDL's encoding, ProtoPNet's
                             latent patches averaged over positions) is for the predicted class, with
                             class means and a shared precision fitted on validation images
    latent_and_prototypes    Fisher's method over nearest_distance, prototype_mahalanobis and
                             latent_mahalanobis (what export calibrates when the graph has the features)
An input is in domain when its score is at most the calibrated threshold (chosen for a stated
false-alarm rate on the validation split); its typicality is the share of validation images that
scored higher (1: as typical as they come, 0: beyond every validation image).

A flat picture (every pixel of each channel within FLAT_LEVELS grey levels of one value: a blank
canvas, a uniform grey) has nothing drawn on it, so it is out of domain with typicality 0 whatever its
score: where the encoder puts such an input is an accident of the training run (issue 24's second seed
answered half the blank images), and no validation image is flat. Callers pass `flat`
(DomainRule.flat of the model input) when they have the images.

Abstention (the request option "abstain", or PROTOSERVE_ABSTAIN=1 for every request): an
out-of-domain answer withholds its label and says why; the nearest prototypes are still shown.
A bundle without calibration answers in_domain and typicality null
and never abstains: the service cannot say, so it does not pretend to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bundle.manifest import DomainCalibration, InputSpec, Manifest
from inference.explain import nearest_distance
from protoserve.domain_scores import (
    distance_profile,
    distance_scores,
    fisher,
    mahalanobis,
    paired_mahalanobis,
    squared_mahalanobis,
    tail_at,
)
from protoserve.errors import InputError

ABSTAIN_REASON = "out_of_domain"
FLAT_LEVELS = 2  # of 255: a picture whose pixels all lie this close to one value shows nothing (JPEG noise allowed)


@dataclass(frozen=True)
class DomainRule:
    """One bundle's calibrated rule, ready for a batch at a time (vectorised, no per-image Python)."""

    calibration: DomainCalibration
    active: np.ndarray  # [M] bool
    class_of: np.ndarray  # [M] the class each prototype stands for
    quantiles: np.ndarray
    levels: np.ndarray
    tails: np.ndarray  # 1 - levels: the share of validation images above each quantile
    class_means: np.ndarray | None = None  # the Mahalanobis scores only
    precision: np.ndarray | None = None
    components: dict[str, np.ndarray] | None = None  # the combined scores only: each part's validation quantiles
    feature_means: np.ndarray | None = None  # the latent scores only
    feature_precision: np.ndarray | None = None
    # both Mahalanobis parts in one product: [K, M + D] means and the block-diagonal precision
    joint_means: np.ndarray | None = None
    joint_precision: np.ndarray | None = None
    # [C] the largest spread, per channel in the model's input space, of a flat picture (None: not checked)
    flat_spread: np.ndarray | None = None


    @property
    def features(self) -> str | None:
        """The model.onnx output the score reads besides the distances (None: none): pass it as `features`."""
        return self.calibration.features or None

    def part(self, name: str, distances: np.ndarray, labels: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        """One part's [N] scores."""
        if name == "prototype_mahalanobis":
            return mahalanobis(distances, labels, self.class_means, self.precision)
        if name == "latent_mahalanobis":
            self.require(features)
            return squared_mahalanobis(features.astype(np.float64, copy=False), labels, self.feature_means,
                                       self.feature_precision)
        if name == "nearest_distance":
            return nearest_distance(distances, self.active)
        return distance_scores(distances, labels, self.active, self.class_of)[name]

    def score(self, distances: np.ndarray, labels: np.ndarray, features: np.ndarray | None = None,
              nearest: np.ndarray | None = None) -> np.ndarray:
        """[N] scores of [N, M] distances (and [N, D] features, for the latent scores) of inputs predicted as labels;
        `nearest`: their nearest_distance, when the caller has it already."""
        if self.components is None:
            if nearest is not None and self.calibration.score == "nearest_distance":
                return nearest
            return self.part(self.calibration.score, distances, labels, features)
        known = self.mahalanobis_parts(distances, labels, features) if self.joint_means is not None else {}
        if nearest is not None:
            known["nearest_distance"] = nearest
        return fisher([tail_at(known[name] if name in known else self.part(name, distances, labels, features),
                               quantiles, self.tails) for name, quantiles in self.components.items()])

    def mahalanobis_parts(self, distances: np.ndarray, labels: np.ndarray,
                          features: np.ndarray | None) -> dict[str, np.ndarray]:
        """prototype_mahalanobis and latent_mahalanobis from one product (the joint block-diagonal form)."""
        self.require(features)
        z = np.concatenate([distance_profile(distances), features], axis=1)
        profile, latent = paired_mahalanobis(z, labels, self.joint_means, self.joint_precision, distances.shape[1])
        return {"prototype_mahalanobis": profile, "latent_mahalanobis": latent}

    def require(self, features: np.ndarray | None) -> None:
        if features is None:
            raise ValueError(f"the out-of-domain score needs model.onnx's {self.calibration.features!r} output")

    def flat(self, images: np.ndarray) -> np.ndarray | None:
        """[N] True for each flat picture of the model input [N, C, H, W] (None: this rule checks none)."""
        if self.flat_spread is None:
            return None
        x = images.reshape(*images.shape[:2], int(np.prod(images.shape[2:])))
        return ((x.max(axis=2) - x.min(axis=2)) <= self.flat_spread).all(axis=1)

    def judge(self, distances: np.ndarray, labels: np.ndarray, features: np.ndarray | None = None,
              nearest: np.ndarray | None = None, flat: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """[N, M] distances, [N] predicted labels (and [N, D] features when `outputs` names them; `nearest`, their
        nearest_distance when the caller has it; `flat`, self.flat of their pictures) -> (in_domain [N] bool,
        typicality [N] float)."""
        scores = self.score(distances, labels, features, nearest)
        in_domain, typicality = scores <= self.calibration.threshold, tail_at(scores, self.quantiles, self.tails)
        if flat is not None and flat.any():
            in_domain, typicality = in_domain & ~flat, np.where(flat, 0.0, typicality)
        return in_domain, typicality


def domain_rule(manifest: Manifest, active: np.ndarray) -> DomainRule | None:
    """The bundle's rule, or None when its manifest has no calibration."""
    if manifest.domain is None:
        return None
    return rule_of(manifest.domain, active, np.array([row.class_identity for row in manifest.prototypes], np.int64),
                   manifest.input)


def flat_spread(spec: InputSpec) -> np.ndarray:
    """[C] FLAT_LEVELS grey levels in the model's input space (pixels scaled to value_range, then / std)."""
    low, high = spec.value_range
    return FLAT_LEVELS / 255.0 * (high - low) / np.asarray(spec.std, np.float64)


def rule_of(c: DomainCalibration, active: np.ndarray, class_of: np.ndarray,
            spec: InputSpec | None = None) -> DomainRule:
    """The rule of one calibration, for prototypes with these active flags and classes (and, given the input
    spec, flat pictures out of domain)."""
    def array(value) -> np.ndarray | None:
        return None if value is None else np.asarray(value, np.float64)

    components = None if c.components is None else {name: array(q) for name, q in c.components.items()}
    joint = {}
    if {"prototype_mahalanobis", "latent_mahalanobis"} <= set(components or ()):
        m, d = len(c.precision), len(c.feature_precision)
        precision = np.zeros((m + d, m + d))
        precision[:m, :m], precision[m:, m:] = c.precision, c.feature_precision
        joint = {"joint_means": np.concatenate([array(c.class_means), array(c.feature_means)], axis=1),
                 "joint_precision": precision}
    levels = array(c.levels)
    return DomainRule(c, active, class_of, array(c.quantiles), levels, 1.0 - levels, class_means=array(c.class_means),
                      precision=array(c.precision), components=components, feature_means=array(c.feature_means),
                      feature_precision=array(c.feature_precision),
                      flat_spread=None if spec is None else flat_spread(spec), **joint)


def parse_flag(value: object, name: str, default: bool) -> bool:
    """A request's boolean option (JSON true/false, or "true"/"false"/"1"/"0" from a form field)."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise InputError("wrong_type", f'"{name}" must be true or false, not {value!r}')


def abstention(answer: dict, calibration: DomainCalibration) -> dict:
    """Withhold an out-of-domain prediction's label (answer = {"label", "class_name", ...}) and say why."""
    answer.update(label=None, class_name=None, abstained=True, reason=ABSTAIN_REASON,
                  detail=f"unlike the model's validation images: typicality {answer['typicality']:.4g}, below "
                         f"the {calibration.false_alarm_rate:g} false-alarm threshold of its "
                         f"{calibration.score.replace('_', ' ')}")
    return answer
