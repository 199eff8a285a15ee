"""A small generated colour data set in torchvision's ImageFolder layout, for the `folder` tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")  # the class folders, in sorted order
COLOURS = {"circle": (220, 40, 40), "square": (40, 200, 60), "triangle": (50, 80, 230)}


def shape_picture(kind: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One coloured shape of random size and place on a dark, noisy background."""
    background = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(background, "RGB")
    r = int(rng.integers(7, 11))
    cx, cy = (int(v) for v in rng.integers(r + 1, size - r - 1, size=2))
    draw = ImageDraw.Draw(img)
    box = (cx - r, cy - r, cx + r, cy + r)
    if kind == "circle":
        draw.ellipse(box, fill=COLOURS[kind])
    elif kind == "square":
        draw.rectangle(box, fill=COLOURS[kind])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[kind])
    return img


def write_shapes(root: Path, per_class: int, seed: int = 0, size: int = 32) -> Path:
    """<root>/<shape>/<i>.png for each shape, per_class pictures each."""
    rng = np.random.default_rng(seed)
    for kind in SHAPES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape_picture(kind, rng, size).save(root / kind / f"{i:03d}.png")
    return root
