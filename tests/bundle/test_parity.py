"""The parity criterion (bundle/parity.py): a combined limit per output, in the units an answer shows."""

from __future__ import annotations

import numpy as np

from bundle.manifest import Tolerance
from bundle.parity import DISTANCE, FEATURE, OTHER, PROBABILITY, limit_used, output_limits
from protoserve.similarity import similarity

# The entry that failed a 2-round revision of the shipped ProtoPNet under a purely relative limit: a
# revised prototype sitting on a test image's patch, 1.15e-10 apart in absolute terms (2.5e-4 relative).
NEAR_ZERO_TORCH, NEAR_ZERO_ONNX = np.float32(4.59154e-07), np.float32(4.59269e-07)


def test_a_near_zero_distance_with_a_tiny_absolute_difference_passes():
    assert abs(NEAR_ZERO_ONNX - NEAR_ZERO_TORCH) / NEAR_ZERO_TORCH > DISTANCE.rtol  # the old relative limit fails it
    assert limit_used(NEAR_ZERO_ONNX, NEAR_ZERO_TORCH, DISTANCE) <= 1.0
    # ... and the answer shows the same similarity to six significant digits
    shown = similarity(np.float64(NEAR_ZERO_TORCH))
    assert abs(similarity(np.float64(NEAR_ZERO_ONNX)) - shown) < 1e-6 * shown


def test_a_real_distance_difference_fails():
    assert limit_used(np.float32(1e-4), NEAR_ZERO_TORCH, DISTANCE) > 1.0  # the prototype no longer on the patch
    assert limit_used(np.float32(0.5 * (1 + 3e-4)), np.float32(0.5), DISTANCE) > 1.0  # a typical distance, 3e-4 off
    assert limit_used(np.float32(0.5 * (1 + 5e-5)), np.float32(0.5), DISTANCE) <= 1.0


def test_limit_used_is_the_share_of_the_combined_limit():
    tol = Tolerance(atol=1e-5, rtol=1e-4)
    assert limit_used(np.array([0.0, 100.0]), np.array([0.0, 100.0]), tol) == 0.0
    assert np.isclose(limit_used(np.array([5e-6, 100.0]), np.array([0.0, 100.0]), tol), 0.5)
    assert np.isclose(limit_used(np.array([0.0, 100.02]), np.array([0.0, 100.0]), tol), 0.02 / (1e-5 + 1e-2))
    assert limit_used(np.array([1e-30]), np.array([0.0]), Tolerance(atol=0, rtol=0)) == np.inf
    assert limit_used(np.array([np.nan]), np.array([0.0]), tol) == np.inf
    assert limit_used(np.zeros((0, 3)), np.zeros((0, 3)), tol) == 0.0


def test_each_output_an_answer_shows_has_its_limit():
    assert output_limits(["logits", "probabilities", "distances", "similarity_maps", "pooled_latent"]) \
        == {"probabilities": PROBABILITY, "distances": DISTANCE, "pooled_latent": FEATURE}
    assert output_limits(["logits", "probabilities", "distances", "latent", "reconstruction"]) \
        == {"probabilities": PROBABILITY, "distances": DISTANCE, "latent": FEATURE}
    assert (OTHER.atol, OTHER.rtol) == (PROBABILITY.atol, DISTANCE.rtol)
