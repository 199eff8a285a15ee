"""The out-of-domain calibration written into a bundle at export (manifest `domain`).

Validation split only: the test set stays for reporting. The split's images are halved with a fixed
seed: one half fits what a score needs fitted (prototype_mahalanobis's class means and precision),
the other half gives every score's distribution, the threshold at the stated false-alarm rate and
the typicality quantiles. The score is chosen on validation data too: the candidate whose scores
best separate the held-out half from a proxy of unlike inputs made from those same images (their
pixels shuffled: the same ink and brightness, no strokes), by AUROC. Torch-free: `run` is any
image -> (probabilities, distances) function (export passes the staged model.onnx session).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from export.bundle import DOMAIN_SCORES, DomainCalibration
from protoserve.domain_scores import distance_profile, distance_scores, fisher, mahalanobis, upper_tail

DEFAULT_FALSE_ALARM_RATE = 0.01
LEVELS = np.unique(np.concatenate([np.linspace(0.0, 0.98, 50), np.linspace(0.98, 1.0, 41)]))
PROXY = "validation images with their pixels shuffled (one fixed permutation)"
# [N, C, H, W] -> (probabilities [N, K], distances [N, M])
Run = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def calibrate(run: Run, validation: np.ndarray, active: np.ndarray, class_of: np.ndarray, n_classes: int,
              false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE, seed: int = 0) -> DomainCalibration:
    """The calibration of one model from its validation images [N, C, H, W] (model input)."""
    if not 0 < false_alarm_rate < 1:
        raise ValueError(f"false-alarm rate {false_alarm_rate} is not between 0 and 1")
    order = np.random.default_rng(seed).permutation(len(validation))
    fit_half, held_half = order[: len(order) // 2], order[len(order) // 2:]
    probabilities, distances = run(validation)
    labels = probabilities.argmax(axis=1)
    proxy_p, proxy_d = run(shuffled_pixels(validation[held_half], seed))
    means, precision = fit_mahalanobis(distances[fit_half], labels[fit_half], n_classes)

    parts = ("nearest_distance", "prototype_mahalanobis")
    components: dict[str, np.ndarray] = {}

    def scores(d: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
        out = distance_scores(d, y, active, class_of) | {"prototype_mahalanobis": mahalanobis(d, y, means, precision)}
        if not components:  # the first call scores the held-out half: the parts' reference distributions
            components.update({name: np.quantile(out[name], LEVELS) for name in parts})
        out["nearest_and_mahalanobis"] = fisher([upper_tail(out[name], components[name], LEVELS) for name in parts])
        return out

    held = scores(distances[held_half], labels[held_half])
    proxy = scores(proxy_d, proxy_p.argmax(axis=1))
    candidates = {name: round(auroc(held[name], proxy[name]), 6) for name in DOMAIN_SCORES}
    best = max(DOMAIN_SCORES, key=lambda name: candidates[name])  # ties keep the simpler, listed first
    chosen = held[best]
    threshold = float(np.quantile(chosen, 1.0 - false_alarm_rate, method="higher"))
    fitted = {}
    if best in ("prototype_mahalanobis", "nearest_and_mahalanobis"):
        fitted = {"class_means": means.tolist(), "precision": precision.tolist(), "fit_images": len(fit_half)}
    if best == "nearest_and_mahalanobis":
        fitted["components"] = {name: components[name].tolist() for name in parts}
    return DomainCalibration(score=best, images=len(held_half), false_alarm_rate=false_alarm_rate,
                             threshold=threshold, validation_false_alarm_rate=float(np.mean(chosen > threshold)),
                             levels=LEVELS.tolist(), quantiles=np.quantile(chosen, LEVELS).tolist(),
                             candidates=candidates, proxy=PROXY, **fitted)


def fit_mahalanobis(distances: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class means [K, M] of the distance profiles and the precision [M, M] of their shared covariance
    (ridge of 1e-6 of the mean variance, so a degenerate profile still inverts)."""
    z = distance_profile(distances)
    overall = z.mean(axis=0)
    means = np.stack([z[labels == k].mean(axis=0) if (labels == k).any() else overall for k in range(n_classes)])
    r = z - means[labels]
    covariance = r.T @ r / max(1, len(z))
    ridge = 1e-6 * max(float(np.trace(covariance)) / len(covariance), 1e-12)
    return means, np.linalg.inv(covariance + ridge * np.eye(len(covariance)))


def shuffled_pixels(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """The proxy of unlike inputs: every image's pixels moved by one fixed permutation."""
    n = len(images)
    flat = images.reshape(n, images.shape[1], -1)
    permutation = np.random.default_rng(seed).permutation(flat.shape[2])
    return np.ascontiguousarray(flat[:, :, permutation].reshape(images.shape))


def auroc(in_domain: np.ndarray, out_of_domain: np.ndarray) -> float:
    """The probability that an out-of-domain input scores higher than an in-domain one (ties count half)."""
    scores = np.concatenate([in_domain, out_of_domain])
    ranks = _average_ranks(scores)
    n_in, n_out = len(in_domain), len(out_of_domain)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def fpr_at_tpr(in_domain: np.ndarray, out_of_domain: np.ndarray, tpr: float = 0.95) -> float:
    """The share of in-domain inputs flagged by the threshold that flags `tpr` of the out-of-domain ones."""
    threshold = np.quantile(out_of_domain, 1.0 - tpr, method="lower")
    return float(np.mean(in_domain >= threshold))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    ranks = np.empty(len(values), np.float64)
    new_group = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], len(values)]
    ranks[order] = ((starts + ends + 1) / 2.0)[np.cumsum(new_group) - 1]  # 1-based average rank of each tie group
    return ranks
