"""The out-of-domain scores of a model's distances to its prototypes, as numpy functions: one
definition for the export-time calibration (export/calibration.py) and the answers
(inference/domain.py), which sit on different layers. Larger scores are less like the validation
images; inference/domain.py describes each score."""

from __future__ import annotations

import numpy as np

try:  # np.interp's compiled core for real numbers (numpy 2; numpy 1's module had another name)
    from numpy._core.multiarray import interp as _interp
except ImportError:  # pragma: no cover
    def _interp(x, xp, fp, left, right):
        return np.interp(x, xp, fp, left=left, right=right)


def distance_profile(distances: np.ndarray) -> np.ndarray:
    """[N, M] squared distances -> [N, M] L2 distances, the features of prototype_mahalanobis."""
    return np.sqrt(np.maximum(distances, 0.0, dtype=np.float64))


def squared_mahalanobis(z: np.ndarray, labels: np.ndarray, class_means: np.ndarray,
                        precision: np.ndarray) -> np.ndarray:
    """[N] (z - mean_label)' P (z - mean_label) of feature vectors z [N, D] (latent_mahalanobis)."""
    r = z - class_means[labels]
    return (r @ precision * r).sum(axis=1)


def paired_mahalanobis(z: np.ndarray, labels: np.ndarray, class_means: np.ndarray, precision: np.ndarray,
                       split: int) -> tuple[np.ndarray, np.ndarray]:
    """squared_mahalanobis of z[:, :split] and of z[:, split:] at once, for a block-diagonal precision
    (the two blocks' precisions): one matrix product per request instead of two."""
    r = z - class_means[labels]
    both = np.add.reduceat(r @ precision * r, [0, split], axis=1)
    return both[:, 0], both[:, 1]


def mahalanobis(distances: np.ndarray, labels: np.ndarray, class_means: np.ndarray,
                precision: np.ndarray) -> np.ndarray:
    """[N] squared Mahalanobis distance of the distance profiles (prototype_mahalanobis)."""
    return squared_mahalanobis(distance_profile(distances), labels, class_means, precision)


def distance_scores(distances: np.ndarray, labels: np.ndarray, active: np.ndarray,
                    class_of: np.ndarray) -> dict[str, np.ndarray]:
    """The fit-free candidate scores ([N] each) of [N, M] distances, for inputs predicted as labels [N]."""
    d = np.where(active[None, :], distances, np.inf)
    three = np.sort(d, axis=1)[:, :3]
    own = np.where(class_of[None, :] == labels[:, None], d, np.inf).min(axis=1)
    nearest = three[:, 0]
    return {"nearest_distance": nearest,
            "class_nearest_distance": np.where(np.isfinite(own), own, nearest),
            "mean3_distance": np.where(np.isfinite(three), three, nearest[:, None]).mean(axis=1)}


# The smallest tail probability Fisher's combination takes: beyond every validation image is p = 0.
P_FLOOR = 1e-4


def upper_tail(scores: np.ndarray, quantiles, levels) -> np.ndarray:
    """[N] scores -> [N] share of the validation images that scored higher (piecewise linear in the
    validation scores' quantiles at levels)."""
    return tail_at(scores, quantiles, 1.0 - np.asarray(levels))


def tail_at(scores: np.ndarray, quantiles, tails: np.ndarray) -> np.ndarray:
    """upper_tail with the tails (1 - levels) computed once: np.interp(scores, quantiles, tails, left=1.0,
    right=0.0), by the compiled function np.interp calls for real numbers without its checks, which cost
    as much as the interpolation on the answers' few images (float64 arrays of a version's rule)."""
    return _interp(scores, quantiles, tails, 1.0, 0.0)


def fisher(tails: list[np.ndarray]) -> np.ndarray:
    """Fisher's combination of tail probabilities: -sum log p (larger = less typical), as -log of the
    product (one logarithm: fewer numpy calls per request; the floor keeps the product above 1e-12
    for three parts)."""
    product = np.maximum(tails[0], P_FLOOR)
    for p in tails[1:]:
        product = product * np.maximum(p, P_FLOOR)
    return -np.log(product)
