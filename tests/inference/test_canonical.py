"""Photo-like uploads made the way MNIST's digits were made (inference/canonical.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from bundle.manifest import CanonicalForm, InputSpec
from inference.canonical import canonicalize
from inference.preprocess import to_input
from protoserve.errors import InputError

FORM = CanonicalForm(ink="light_on_dark", box=20, centre="mass")
SPEC = InputSpec(channels=1, height=28, width=28, mean=[0.0], std=[1.0], canonical=FORM)


@pytest.fixture(scope="module")
def digits(mnist_root) -> np.ndarray:
    from training.mnist import load_split

    images, _ = load_split(mnist_root, "mnist", "test")
    return images[:20].astype(np.float32) / 255.0


def test_canonicalisation_is_idempotent_and_leaves_an_mnist_digit_as_it_is(digits):
    for x in digits:
        once = canonicalize(x, FORM, 28, 28)
        assert np.array_equal(canonicalize(once, FORM, 28, 28), once)
        assert np.abs(once - x).max() < 1e-6 or np.corrcoef(once.ravel(), x.ravel())[0, 1] > 0.95


def test_a_photographed_digit_comes_back_like_the_digit(digits):
    """Dark ink on grey paper, five times as large, off centre, JPEG: close to the original after it."""
    x = digits[0]
    big = np.asarray(Image.fromarray((x * 255).astype(np.uint8)).resize((140, 140), Image.Resampling.BICUBIC),
                     np.float32) / 255.0
    paper = np.full((200, 200), 0.85, np.float32)
    paper[10:150, 50:190] -= 0.7 * big
    buffer = io.BytesIO()
    Image.fromarray((paper * 255).astype(np.uint8)).convert("RGB").save(buffer, format="JPEG", quality=75)
    plain = to_input(buffer.getvalue(), SPEC)[0]
    canonical = to_input(buffer.getvalue(), SPEC, canonical=True)[0]
    assert np.corrcoef(canonical.ravel(), x.ravel())[0, 1] > 0.9
    assert np.corrcoef(plain.ravel(), x.ravel())[0, 1] < 0.3


def test_blank_pictures_stay_blank_and_arrays_are_canonicalised_too(digits):
    assert not canonicalize(np.ones((50, 40), np.float32), FORM, 28, 28).any()
    shifted = np.roll(digits[1], (5, -4), axis=(0, 1))
    out = to_input(shifted.tolist(), SPEC, canonical=True)[0]
    assert np.corrcoef(out.ravel(), digits[1].ravel())[0, 1] > 0.95


def test_canonicalize_is_refused_without_a_canonical_form():
    spec = InputSpec(channels=1, height=28, width=28, mean=[0.0], std=[1.0])
    with pytest.raises(InputError) as e:
        to_input(np.zeros((28, 28)).tolist(), spec, canonical=True)
    assert e.value.reason == "no_canonical_form" and e.value.status == 400
