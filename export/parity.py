"""Parity: ONNX Runtime against PyTorch eval mode on the same images, and the limits export demands.

The criterion is bundle/parity.py's, on what a served answer depends on: probabilities, distances and
the out-of-domain features (bundle/families.py domain_features, where the graph has them) each within
|onnx - torch| <= atol + rtol * |torch| in its own units; the same argmax for every image; the same
top-3 nearest prototype ids in the same order, except where an exact tie makes the order ambiguous.
Numpy only; the callers produce the two sets of outputs.

A tie is equality to within float32 rounding (TIE_ULPS units in the last place) or to within the
relative disagreement the two runtimes measurably have on the distances (itself held to the
distance limit): ProtoPNet's prototypes of one class sit on neighbouring patches, and an input's
distances to two of them can differ by less than that, an order no float32 runtime is bound to
reproduce.
"""

from __future__ import annotations

import numpy as np

from bundle.families import domain_feature_outputs
from bundle.manifest import ParityFigures, Tolerance
from bundle.parity import DISTANCE, DISTANCE_RTOL, FEATURE, PROBABILITY, limit_used, output_limits

TOP_K = 3
TIE_ULPS = 4


def top_k_nearest(distances: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """Ids of the k nearest prototypes per row, nearest first (stable: lower id first on a tie)."""
    return np.argsort(distances, axis=1, kind="stable")[:, :k]


def top_k_disagreements(reference: np.ndarray, candidate: np.ndarray, k: int = TOP_K,
                        rtol: float = 0.0) -> tuple[int, int]:
    """(mismatches, ties): rows whose top-k ids differ, and those among them excused by an exact tie.

    A difference is a tie when, by the reference's own distances, the candidate's ids are as near
    as the reference's at every rank (to within TIE_ULPS float32 units in the last place, or
    relatively within rtol): then either order is a correct answer.
    """
    ref_ids, cand_ids = top_k_nearest(reference, k), top_k_nearest(candidate, k)
    differ = np.any(ref_ids != cand_ids, axis=1)
    rows = np.arange(len(reference))[:, None]
    a, b = reference[rows, ref_ids].astype(np.float32), reference[rows, cand_ids].astype(np.float32)
    larger = np.maximum(np.abs(a), np.abs(b))
    tied = np.all(np.abs(a.astype(np.float64) - b) <= np.maximum(TIE_ULPS * np.spacing(larger), rtol * larger),
                  axis=1)
    ties = int(np.sum(differ & tied))
    return int(np.sum(differ)) - ties, ties


def parity_figures(torch_out: dict[str, np.ndarray], onnx_out: dict[str, np.ndarray]) -> ParityFigures:
    """Compare `probabilities`, `distances` and the out-of-domain features of both runtimes over the same images."""
    p_ref, p = torch_out["probabilities"].astype(np.float64), onnx_out["probabilities"].astype(np.float64)
    d_ref, d = torch_out["distances"].astype(np.float64), onnx_out["distances"].astype(np.float64)
    rel = np.abs(d - d_ref) / np.maximum(np.abs(d_ref), np.finfo(np.float32).tiny)
    # Two distances nearer to each other than the runtimes' own disagreement can come in either order.
    agreement = min(float(rel.max(initial=0.0)), DISTANCE_RTOL)
    mismatches, ties = top_k_disagreements(torch_out["distances"], onnx_out["distances"], rtol=2 * agreement)
    limits = output_limits([name for name in torch_out if name in onnx_out])
    return ParityFigures(
        images=len(p_ref),
        max_abs_probability_diff=float(np.abs(p - p_ref).max(initial=0.0)),
        max_rel_distance_diff=float(rel.max(initial=0.0)),
        argmax_mismatches=int(np.sum(p_ref.argmax(1) != p.argmax(1))),
        top3_mismatches=mismatches,
        top3_ties=ties,
        probability_atol=PROBABILITY.atol,
        distance_rtol=DISTANCE.rtol,
        limits=limits,
        limit_used={name: limit_used(onnx_out[name], torch_out[name], tol) for name, tol in limits.items()},
        **feature_parity(torch_out, onnx_out),
    )


def features_name(torch_out: dict[str, np.ndarray], onnx_out: dict[str, np.ndarray]) -> str | None:
    """The out-of-domain features output both runtimes produced (None: the graph has none)."""
    return next((n for n in domain_feature_outputs() if n in torch_out and n in onnx_out), None)


def feature_parity(torch_out: dict[str, np.ndarray], onnx_out: dict[str, np.ndarray]) -> dict:
    """The features output's largest difference relative to its largest magnitude (none: no such output)."""
    name = features_name(torch_out, onnx_out)
    if name is None:
        return {}
    ref, got = torch_out[name].astype(np.float64), onnx_out[name].astype(np.float64)
    scale = max(float(np.abs(ref).max(initial=0.0)), np.finfo(np.float32).tiny)
    return {"max_rel_feature_diff": float(np.abs(got - ref).max(initial=0.0)) / scale, "feature_rtol": FEATURE.rtol}


def parity_failures(f: ParityFigures) -> list[str]:
    """The limits `f` misses, as readable phrases; empty when parity holds."""
    failures = limit_failures(f) if f.limit_used is not None else relative_failures(f)
    if f.argmax_mismatches:
        failures.append(f"{f.argmax_mismatches} of {f.images} images get a different predicted class")
    if f.top3_mismatches:
        failures.append(f"{f.top3_mismatches} of {f.images} images get different top-{TOP_K} nearest prototypes")
    return failures


def limit_failures(f: ParityFigures) -> list[str]:
    """The outputs beyond their combined limit atol + rtol * |x|."""
    return [f"{name} differ by up to {used:.3g} times their limit ({limit_text(f.limits[name])})"
            for name, used in f.limit_used.items() if not used <= 1.0]


def limit_text(tol: Tolerance) -> str:
    return f"{tol.atol:.3g} + {tol.rtol:g} * |x|"


def relative_failures(f: ParityFigures) -> list[str]:
    """Figures of an older bundle, which hold only the relative limits."""
    failures = []
    if not f.max_abs_probability_diff <= f.probability_atol:
        failures.append(f"probabilities differ by up to {f.max_abs_probability_diff:.3g} "
                        f"(limit {f.probability_atol:g})")
    if not f.max_rel_distance_diff <= f.distance_rtol:
        failures.append(f"distances differ by up to {f.max_rel_distance_diff:.3g} relative (limit {f.distance_rtol:g})")
    if f.max_rel_feature_diff is not None and not f.max_rel_feature_diff <= f.feature_rtol:
        failures.append(f"out-of-domain features differ by up to {f.max_rel_feature_diff:.3g} of their scale "
                        f"(limit {f.feature_rtol:g})")
    return failures


def describe(f: ParityFigures) -> str:
    if f.limit_used is None:
        limits = (f"max |dp| {f.max_abs_probability_diff:.2e} (limit {f.probability_atol:g}), "
                  f"max rel dd {f.max_rel_distance_diff:.2e} (limit {f.distance_rtol:g}), ")
    else:
        limits = "".join(f"{name} at {used:.2g} of their limit ({limit_text(f.limits[name])}), "
                         for name, used in f.limit_used.items())
    return (f"parity on {f.images} images: {limits}max |dp| {f.max_abs_probability_diff:.2e}, "
            f"max rel dd {f.max_rel_distance_diff:.2e}, argmax mismatches {f.argmax_mismatches}, "
            f"top-{TOP_K} mismatches {f.top3_mismatches} (ties excused: {f.top3_ties})")
