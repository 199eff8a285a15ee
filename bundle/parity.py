"""The parity criterion: how closely two runtimes' outputs must agree for a served answer to be the same.

One definition for export (export/parity.py: ONNX Runtime against PyTorch on the test set), revision
(which exports through the same function) and `protoserve verify` (bundle/runtime.py: the golden probe
against the outputs stored at export). Each output an answer shows is held to

    |a - b| <= atol + rtol * |b|        (b the reference, in the output's own units)

Distances are squared L2 in the latent space; the similarity an answer shows, log((d+1)/(d+1e-4)), is
computed from the served distance, so it moves by at most |dd| / (d + 1e-4). Numpy only, no torch.
"""

from __future__ import annotations

import numpy as np

from bundle.families import domain_feature_outputs
from bundle.manifest import Tolerance

FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 2^-23: the relative rounding step of one float32 operation

# A probability is a softmax of logits whose magnitude is tens (M similarities of at most log(1e4) or
# distances of at most tens, times last-layer weights of order 1): float32 eps times a logit of ~80 is
# 1e-5, and a probability moves by at most a quarter of a logit's error (dp = p(1 - p) dlogit).
PROBABILITY_ATOL = 1e-5
# Probabilities are shown on the fixed [0, 1] scale, where the absolute limit already is the one that
# matters; a relative term would loosen nothing near 1 and protect nothing near 0.
PROBABILITY_RTOL = 0.0
# Float32 eps times ||z||^2 + ||p||^2, the magnitudes that enter a float32 distance (training expands
# ||z||^2 - 2 z.p + ||p||^2 and cancels them): the trained latents and prototypes of both families are
# sigmoid outputs of squared norm below 16 each, so 32 eps is the resolution of a distance near 0 (a
# prototype sitting on a patch of the input), where a relative limit alone asks for digits float32
# does not hold.
DISTANCE_ATOL = 32 * FLOAT32_EPS
# Each latent value ends a chain of convolutions summing hundreds to thousands of float32 products in
# an order each runtime chooses (rounding grows with the number of terms, ~1000 eps at most), and a
# distance sums squares of differences of such values: four significant digits are what is promised.
DISTANCE_RTOL = 1e-4
# The out-of-domain features are latents in (0, 1) (sigmoid outputs): ~100 float32 eps at their scale
# of 1, the rounding of the convolution sums before them, as the floor for features near 0.
FEATURE_ATOL = 1e-5
# The same encoder values as the distances are made of, so the same relative promise.
FEATURE_RTOL = DISTANCE_RTOL

PROBABILITY = Tolerance(atol=PROBABILITY_ATOL, rtol=PROBABILITY_RTOL)
DISTANCE = Tolerance(atol=DISTANCE_ATOL, rtol=DISTANCE_RTOL)
FEATURE = Tolerance(atol=FEATURE_ATOL, rtol=FEATURE_RTOL)
# Outputs no answer shows directly (logits, similarity maps, reconstructions): the probability's absolute
# and the distance's relative limit (ProbeSpec.atol and rtol).
OTHER = Tolerance(atol=PROBABILITY_ATOL, rtol=DISTANCE_RTOL)


def output_limits(outputs: list[str]) -> dict[str, Tolerance]:
    """The tolerance of each of these model.onnx outputs that the criterion names (a family's
    out-of-domain features output by the family registry's name for it)."""
    named = {"probabilities": PROBABILITY, "distances": DISTANCE} | dict.fromkeys(domain_feature_outputs(), FEATURE)
    return {name: named[name] for name in outputs if name in named}


def limit_used(actual: np.ndarray, expected: np.ndarray, tol: Tolerance) -> float:
    """The largest |actual - expected| / (atol + rtol * |expected|): at most 1 means within `tol`."""
    a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.size == 0:
        return 0.0
    diff, limit = np.abs(a - b), tol.atol + tol.rtol * np.abs(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(diff == 0, 0.0, diff / limit)  # a zero limit admits only equality
    return float(np.where(np.isnan(share), np.inf, share).max())

