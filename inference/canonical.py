"""Photo-like uploads made the way the training images were made (the manifest's `input.canonical`).

MNIST's digits are light ink on a dark background; each digit's ink was fitted into a 20x20 box
(aspect ratio kept) and placed in the 28x28 field so that its centre of mass sits at the centre.
A photographed or scanned digit (dark ink on light paper, large, off centre) meets the model on
those terms only after the same steps: invert when the background is light, stretch the ink to
the full range, crop to the ink, fit into the box, centre by mass. Torch-free (numpy and PIL).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from bundle.manifest import CanonicalForm

# A pixel is ink for the bounding box when it is this far above the background, as a fraction of
# the brightest ink: JPEG ringing and paper texture stay below it, MNIST's anti-aliased edges above.
INK_THRESHOLD = 0.2
# An ink box already within this many pixels of the target size is not resampled, so a training
# image passes through unchanged (and canonicalisation is idempotent).
FIT_TOLERANCE = 2


def canonicalize(grey: np.ndarray, form: CanonicalForm, height: int, width: int) -> np.ndarray:
    """One grey picture [h, w] with values in [0, 1] (any size) -> [height, width] in [0, 1], the
    training images' form. A picture without ink (blank or constant) comes back all background."""
    ink = ink_on_dark(np.asarray(grey, dtype=np.float32), form)
    rows, cols = np.flatnonzero(ink.max(axis=1) > INK_THRESHOLD), np.flatnonzero(ink.max(axis=0) > INK_THRESHOLD)
    if rows.size == 0:
        return np.zeros((height, width), np.float32)
    crop = fit(ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], form.box)
    return place(crop, form.centre, height, width)


def ink_on_dark(grey: np.ndarray, form: CanonicalForm) -> np.ndarray:
    """Invert when the background (the border's median) is light; then background -> 0, brightest ink -> 1."""
    border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    background = float(np.median(border))
    if (background > 0.5) == (form.ink == "light_on_dark"):
        grey, background = 1.0 - grey, 1.0 - background
    span = float(grey.max()) - background
    if span <= 1e-6:
        return np.zeros_like(grey)
    return np.clip((grey - background) / span, 0.0, 1.0)


def fit(crop: np.ndarray, box: int) -> np.ndarray:
    """Scale the ink's crop so its longer side is `box` pixels (area-averaging when shrinking)."""
    longer = max(crop.shape)
    if box - FIT_TOLERANCE <= longer <= box:
        return crop
    scale = box / longer
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))  # PIL: (w, h)
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    resized = Image.fromarray(crop.astype(np.float32), mode="F").resize(size, resample)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def place(crop: np.ndarray, centre: str, height: int, width: int) -> np.ndarray:
    """Put the crop in a [height, width] field, its centre of mass (or box centre) at the field's centre."""
    h, w = crop.shape
    if centre == "mass" and crop.sum() > 0:
        total = crop.sum()
        cy = float((crop.sum(axis=1) * np.arange(h)).sum() / total)
        cx = float((crop.sum(axis=0) * np.arange(w)).sum() / total)
    else:
        cy, cx = (h - 1) / 2, (w - 1) / 2
    # MNIST's centre of mass sits at pixel index height / 2 (14 of 0..27).
    top = int(np.clip(round(height / 2 - cy), 0, height - h))
    left = int(np.clip(round(width / 2 - cx), 0, width - w))
    field = np.zeros((height, width), np.float32)
    field[top:top + h, left:left + w] = crop[:height, :width]
    return field
