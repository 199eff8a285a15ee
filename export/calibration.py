"""The out-of-domain calibration written into a bundle at export (manifest `domain`).

Validation split only: the test set stays for reporting. The split's images are halved with a fixed
seed: one half fits what a score needs fitted (class means and a shared precision matrix for each
Mahalanobis part), the other half gives the score's distribution, the threshold at the stated
false-alarm rate and the typicality quantiles.

The score is fixed, not chosen by a proxy: Fisher's combination of every kind of evidence the graph
gives, each part's tail probability under its own validation distribution:
    latent_and_prototypes     nearest_distance + prototype_mahalanobis + latent_mahalanobis, when
                              model.onnx has the family's features output (bundle/families.py)
    nearest_and_mahalanobis   nearest_distance + prototype_mahalanobis, when it has not
The parts answer different questions (is any prototype near; is the pattern of distances usual for
the predicted class; is the input's place in the latent space usual for that class), so no single
part's blind spot is the rule's. `candidates` records, as a check and not a choice, every candidate
score's mean AUROC against proxies of unlike inputs made from the held-out validation images
(PROXIES). Torch-free: `run` is any image -> (probabilities, distances, features or None) function
(export passes the staged model.onnx session).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bundle.manifest import DomainCalibration
from protoserve.domain_scores import (
    distance_profile,
    distance_scores,
    fisher,
    mahalanobis,
    squared_mahalanobis,
    upper_tail,
)

DEFAULT_FALSE_ALARM_RATE = 0.01
LEVELS = np.unique(np.concatenate([np.linspace(0.0, 0.98, 50), np.linspace(0.98, 1.0, 41)]))
PARTS = {"nearest_and_mahalanobis": ("nearest_distance", "prototype_mahalanobis"),
         "latent_and_prototypes": ("nearest_distance", "prototype_mahalanobis", "latent_mahalanobis")}
# [N, C, H, W] -> (probabilities [N, K], distances [N, M], features [N, D] or None)
Run = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray | None]]


def calibrate(run: Run, validation: np.ndarray, active: np.ndarray, class_of: np.ndarray, n_classes: int,
              false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE, seed: int = 0,
              features: str | None = None) -> DomainCalibration:
    """The calibration of one model from its validation images [N, C, H, W] (model input); `features`
    names the output `run` returns as its third value (None: it returns None there)."""
    if not 0 < false_alarm_rate < 1:
        raise ValueError(f"false-alarm rate {false_alarm_rate} is not between 0 and 1")
    order = np.random.default_rng(seed).permutation(len(validation))
    fit_half, held_half = order[: len(order) // 2], order[len(order) // 2:]
    probabilities, distances, latent = run(validation)
    labels = probabilities.argmax(axis=1)
    profile = fit_gaussian(distance_profile(distances[fit_half]), labels[fit_half], n_classes)
    feature_fit = None if latent is None else fit_gaussian(np.asarray(latent[fit_half], np.float64),
                                                            labels[fit_half], n_classes)
    score = "latent_and_prototypes" if feature_fit is not None else "nearest_and_mahalanobis"
    held = part_scores(distances[held_half], labels[held_half], None if latent is None else latent[held_half],
                       active, class_of, profile, feature_fit)
    components = {name: np.quantile(held[name], LEVELS) for name in PARTS[score]}
    combine(held, components)
    chosen = held[score]
    threshold = float(np.quantile(chosen, 1.0 - false_alarm_rate, method="higher"))
    candidates = proxy_check(run, validation[held_half], held, active, class_of, profile, feature_fit,
                             components, seed)
    fitted = {"class_means": profile[0].tolist(), "precision": profile[1].tolist(), "fit_images": len(fit_half),
              "components": {name: q.tolist() for name, q in components.items()}}
    if feature_fit is not None:
        fitted |= {"features": features, "feature_means": feature_fit[0].tolist(),
                   "feature_precision": feature_fit[1].tolist()}
    return DomainCalibration(score=score, images=len(held_half), false_alarm_rate=false_alarm_rate,
                             threshold=threshold, validation_false_alarm_rate=float(np.mean(chosen > threshold)),
                             levels=LEVELS.tolist(), quantiles=np.quantile(chosen, LEVELS).tolist(),
                             candidates=candidates, proxy="mean over " + "; ".join(PROXIES), **fitted)


Gaussian = tuple[np.ndarray, np.ndarray]  # class means [K, D], shared precision [D, D]


def part_scores(distances: np.ndarray, labels: np.ndarray, latent: np.ndarray | None, active: np.ndarray,
                class_of: np.ndarray, profile: Gaussian, feature_fit: Gaussian | None) -> dict[str, np.ndarray]:
    """Every single-part candidate score ([N] each) of one set of outputs."""
    out = distance_scores(distances, labels, active, class_of)
    out["prototype_mahalanobis"] = mahalanobis(distances, labels, *profile)
    if feature_fit is not None:
        out["latent_mahalanobis"] = squared_mahalanobis(np.asarray(latent, np.float64), labels, *feature_fit)
    return out


def combine(scores: dict[str, np.ndarray], components: dict[str, np.ndarray]) -> None:
    """Add the combined scores whose parts are all in `scores` (tails against `components`)."""
    for name, parts in PARTS.items():
        if all(part in scores and part in components for part in parts):
            scores[name] = fisher([upper_tail(scores[part], components[part], LEVELS) for part in parts])


def fit_gaussian(z: np.ndarray, labels: np.ndarray, n_classes: int) -> Gaussian:
    """Class means [K, D] of features z [N, D] by predicted label and the precision [D, D] of their shared
    covariance (ridge of 1e-6 of the mean variance, so a degenerate feature still inverts)."""
    overall = z.mean(axis=0)
    means = np.stack([z[labels == k].mean(axis=0) if (labels == k).any() else overall for k in range(n_classes)])
    r = z - means[labels]
    covariance = r.T @ r / max(1, len(z))
    ridge = 1e-6 * max(float(np.trace(covariance)) / len(covariance), 1e-12)
    return means, np.linalg.inv(covariance + ridge * np.eye(len(covariance)))


# Proxies of unlike inputs for the check in `candidates`: transformations of validation images, none of
# them one of benchmarks/ood_sets.py's sets (no rotation, inversion, pairs, glyphs or noise images).
PROXIES = ("pixels shuffled", "7x7 tiles shuffled", "a 12x12 block erased", "strokes dilated 4x4")


def proxy_sets(images: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    """The PROXIES of [N, C, H, W] images, in order."""
    return [shuffled_pixels(images, seed), shuffled_tiles(images, 7, seed), erased_block(images, 12, seed),
            dilated(images, 4)]


def proxy_check(run: Run, held_images: np.ndarray, held: dict[str, np.ndarray], active: np.ndarray,
                class_of: np.ndarray, profile: Gaussian, feature_fit: Gaussian | None,
                components: dict[str, np.ndarray], seed: int) -> dict[str, float]:
    """Every candidate's mean AUROC (held-out half against each proxy)."""
    results: dict[str, list[float]] = {}
    for proxy in proxy_sets(held_images, seed):
        p, d, f = run(proxy)
        scores = part_scores(d, p.argmax(axis=1), f, active, class_of, profile, feature_fit)
        all_components = components | {n: np.quantile(held[n], LEVELS) for n in held if n not in components}
        combine(scores, all_components)
        for name in held:
            results.setdefault(name, []).append(auroc(held[name], scores[name]))
    return {name: round(float(np.mean(values)), 6) for name, values in results.items()}


def shuffled_pixels(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Every image's pixels moved by one fixed permutation."""
    n = len(images)
    flat = images.reshape(n, images.shape[1], -1)
    permutation = np.random.default_rng(seed).permutation(flat.shape[2])
    return np.ascontiguousarray(flat[:, :, permutation].reshape(images.shape))


def shuffled_tiles(images: np.ndarray, tile: int, seed: int = 0) -> np.ndarray:
    """Every image cut into tile x tile pieces (the part that fits), put back in one fixed shuffled order."""
    n, c, h, w = images.shape
    gh, gw = h // tile, w // tile
    out = images.copy()
    body = images[:, :, :gh * tile, :gw * tile].reshape(n, c, gh, tile, gw, tile).transpose(0, 1, 2, 4, 3, 5)
    pieces = body.reshape(n, c, gh * gw, tile, tile)[:, :, np.random.default_rng(seed).permutation(gh * gw)]
    out[:, :, :gh * tile, :gw * tile] = pieces.reshape(n, c, gh, gw, tile, tile).transpose(0, 1, 2, 4, 3, 5) \
        .reshape(n, c, gh * tile, gw * tile)
    return out


def erased_block(images: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Every image with one size x size block set to its smallest value, at a seeded place in the middle."""
    n, _, h, w = images.shape
    out = images.copy()
    corners = np.random.default_rng(seed).integers(0, [max(1, h - size), max(1, w - size)], (n, 2))
    low = images.reshape(n, -1).min(axis=1)
    for i, (top, left) in enumerate(corners):
        out[i, :, top:top + size, left:left + size] = low[i]
    return out


def dilated(images: np.ndarray, size: int) -> np.ndarray:
    """Every image's bright strokes thickened: the maximum over a size x size window."""
    h, w = images.shape[2:]
    padded = np.pad(images, ((0, 0), (0, 0), (0, size - 1), (0, size - 1)), mode="edge")
    return np.max([padded[:, :, dy:dy + h, dx:dx + w] for dy in range(size) for dx in range(size)], axis=0)


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
