"""The explanation-quality measures as pure numpy functions of scores, maps and masks.

Each is small enough to check against a constructed case whose value is known (tests/export/
test_quality_measures.py); export/quality/probes.py produces their inputs from a model.
"""

from __future__ import annotations

import numpy as np


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-d array, ties given their average rank (as scipy.stats.rankdata)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    group = np.cumsum(starts) - 1  # tie group of each sorted position
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], len(values)] - 1
    ranks = np.empty(len(values))
    ranks[order] = (first[group] + last[group]) / 2.0 + 1.0
    return ranks


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` for the bool labels `positive` (Mann-Whitney U with ties
    counted half); None when one of the two classes is absent."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def class_discrimination(similarities: np.ndarray, labels: np.ndarray, identities: list[int]) -> list[float | None]:
    """Per prototype j: AUROC of its similarity [N, M] (higher = more alike) for "the image is of
    class identities[j]"."""
    return [auroc(similarities[:, j], labels == c) for j, c in enumerate(identities)]


def same_patch_groups(sources: list[tuple | None]) -> list[list[int]]:
    """Groups (of two or more prototype indices) pushed onto the same training patch; `sources[j]` is
    (image index, row, col) or None for a prototype without one."""
    groups: dict[tuple, list[int]] = {}
    for j, source in enumerate(sources):
        if source is not None:
            groups.setdefault(tuple(source), []).append(j)
    return [g for g in groups.values() if len(g) > 1]


def pairwise_squared_distances(vectors: np.ndarray) -> np.ndarray:
    """[M, D] -> [M, M] squared L2 distances, computed by subtraction (exact for near-equal rows)."""
    v = np.asarray(vectors, dtype=np.float64)
    return ((v[:, None, :] - v[None, :, :]) ** 2).sum(axis=-1)


def near_duplicate_pairs(vectors: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """(i, j, squared distance) for every pair i < j of prototype vectors closer than `threshold`."""
    d = pairwise_squared_distances(vectors)
    i, j = np.nonzero(np.triu(d < threshold, k=1))
    return [(int(a), int(b), float(d[a, b])) for a, b in zip(i, j, strict=True)]


def nearest_neighbour_distances(encodings: np.ndarray, groups: np.ndarray | None = None,
                                chunk: int = 256) -> np.ndarray:
    """[N] squared L2 from each encoding [N, D] to its nearest other encoding; with `groups` [N]
    (e.g. the image a patch comes from), only encodings of another group count."""
    e = np.asarray(encodings, dtype=np.float64)
    groups = np.arange(len(e)) if groups is None else np.asarray(groups)
    out = np.empty(len(e))
    for start in range(0, len(e), chunk):
        d = ((e[start:start + chunk, None, :] - e[None, :, :]) ** 2).sum(axis=-1)
        same = groups[start:start + chunk, None] == groups[None, :]
        out[start:start + chunk] = np.where(same, np.inf, d).min(axis=1)
    return out


def used_by_last_layer(weights: np.ndarray, active: np.ndarray, relative: float = 0.01) -> np.ndarray:
    """[M] bool: the prototype is active and its largest |weight| (weights [K, M]) is at least
    `relative` times the largest |weight| of the layer; anything smaller cannot move a logit."""
    strength = np.abs(weights).max(axis=0)
    return active & (strength >= relative * max(float(strength.max()), 1e-12))


def top_fraction(activation: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """Bool mask of the `fraction` highest pixels of an activation map (at least one pixel)."""
    flat = activation.ravel()
    k = max(1, int(round(fraction * flat.size)))
    mask = np.zeros(flat.size, dtype=bool)
    mask[np.argsort(-flat, kind="stable")[:k]] = True
    return mask.reshape(activation.shape)


def activation_precision(activation: np.ndarray, mask: np.ndarray, fraction: float = 0.05) -> float:
    """IAIA-BL's activation precision: the share of the top `fraction` activation pixels inside `mask`."""
    return float(mask[top_fraction(activation, fraction)].mean())


def grid_cell(activation: np.ndarray, cells: int) -> int:
    """The cell (row-major, of a cells x cells grid over the map) holding the map's maximum: the
    "part" a prototype points at, when no part annotations exist."""
    h, w = activation.shape
    y, x = np.unravel_index(int(np.argmax(activation)), activation.shape)
    return int(min(y * cells // h, cells - 1) * cells + min(x * cells // w, cells - 1))


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps of the same shape (0 when either is constant)."""
    ra, rb = average_ranks(np.ravel(a)), average_ranks(np.ravel(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else 0.0


def curve_area(curve: np.ndarray) -> float:
    """Area under a curve sampled at equal steps over [0, 1] of the pixels (trapezoids)."""
    curve = np.asarray(curve, dtype=np.float64)
    return float(((curve[1:] + curve[:-1]) / 2.0).sum() / (len(curve) - 1))


def pixel_order(activation: np.ndarray) -> np.ndarray:
    """Pixel indices (flattened) from the most to the least activated, ties in index order."""
    return np.argsort(-activation.ravel(), kind="stable")
