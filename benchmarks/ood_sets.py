"""Out-of-domain image sets for MNIST models, built on this machine (nothing downloaded).

Every builder returns float32 [N, 1, 28, 28] in [0, 1], seeded, light ink on dark like MNIST:
    uniform_noise, gaussian_noise   per-pixel noise (uniform [0, 1]; N(0.5, 0.25) clipped)
    blank                           all black or all white
    constant                        one random grey level per image
    inverted_digits                 test digits, dark ink on light (1 - x)
    glyphs                          letters and symbols rendered from installed TrueType fonts, made
                                    the MNIST way (ink fitted into 20x20, centred by mass); glyphs
                                    that are drawn like a digit (O o I l i Z z S s B b g q D G) are left out
    rotated_digits                  test digits rotated by 90 degrees
    digit_pairs                     two test digits side by side, the pair fitted the MNIST way
And photo_like(): test digits as a phone photo of paper would give them (dark ink on light, scaled
up, off centre, grey paper with noise, JPEG), as PNG/JPEG bytes for the service's own decoding.
"""

from __future__ import annotations

import io
import string
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bundle.manifest import CanonicalForm
from inference.canonical import canonicalize

MNIST_FORM = CanonicalForm(ink="light_on_dark", box=20, centre="mass")
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")
DIGIT_LIKE = set("OoIliZzSsBbgqDG")
SYMBOLS = "+-*/=#@&%$?!<>()[]{}~^|\\;:\"'"
# Single strokes: made the MNIST way they are drawings of a 1. They stay in the glyph set (the
# benchmark is not changed to suit the models); benchmarks/ood.py reports them apart.
STROKES = "/|\\()[]!'"


def uniform_noise(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, 1, 28, 28)).astype(np.float32)


def gaussian_noise(n: int, seed: int = 0) -> np.ndarray:
    return np.clip(np.random.default_rng(seed).normal(0.5, 0.25, (n, 1, 28, 28)), 0, 1).astype(np.float32)


def blank(n: int, seed: int = 0) -> np.ndarray:
    return np.repeat(np.arange(n) % 2, 784).reshape(n, 1, 28, 28).astype(np.float32)


def constant(n: int, seed: int = 0) -> np.ndarray:
    levels = np.random.default_rng(seed).uniform(0, 1, n).astype(np.float32)
    return np.broadcast_to(levels[:, None, None, None], (n, 1, 28, 28)).copy()


def inverted_digits(digits: np.ndarray) -> np.ndarray:
    return 1.0 - digits


def rotated_digits(digits: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(digits, k=1, axes=(2, 3)))


def digit_pairs(digits: np.ndarray, seed: int = 0) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(len(digits))
    pairs = np.concatenate([digits[:, 0], digits[order, 0]], axis=2)  # [N, 28, 56]
    return np.stack([canonicalize(p, MNIST_FORM, 28, 28) for p in pairs])[:, None]


def font_files() -> list[Path]:
    found = sorted({p for d in FONT_DIRS if Path(d).is_dir() for p in Path(d).rglob("*.ttf")})
    return [p for p in found if "glyphicons" not in p.name.lower()]  # an icon font: no letters


def glyph_characters() -> str:
    letters = string.ascii_uppercase + string.ascii_lowercase
    return "".join(c for c in letters if c not in DIGIT_LIKE) + SYMBOLS


def glyphs(n: int | None = None, seed: int = 0) -> np.ndarray:
    """Every glyph character in every installed font (or n of them, chosen with the seed)."""
    return glyphs_with_characters(n, seed)[0]


def glyphs_with_characters(n: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """glyphs(n, seed) and each image's character [N] (str)."""
    images, characters = [], []
    for path in font_files():
        font = ImageFont.truetype(str(path), 96)
        for ch in glyph_characters():
            canvas = Image.new("L", (160, 160), 0)
            ImageDraw.Draw(canvas).text((80, 80), ch, fill=255, font=font, anchor="mm")
            pixels = np.asarray(canvas, np.float32) / 255.0
            if pixels.max() > 0:
                images.append(canonicalize(pixels, MNIST_FORM, 28, 28))
                characters.append(ch)
    out, characters = np.stack(images)[:, None], np.array(characters)
    if n is not None and n < len(out):
        chosen = np.random.default_rng(seed).choice(len(out), n, replace=False)
        out, characters = out[chosen], characters[chosen]
    return out, characters


def photo_like(digits: np.ndarray, seed: int = 0, size: int = 200) -> list[bytes]:
    """Test digits as photographs of dark ink on light paper: JPEG bytes, size x size RGB."""
    rng = np.random.default_rng(seed)
    out = []
    for x in digits[:, 0]:
        scale = rng.uniform(3.0, 5.0)  # the 28x28 field becomes 84-140 px
        side = int(28 * scale)
        digit = np.asarray(Image.fromarray((x * 255).astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC),
                           np.float32) / 255.0
        paper = rng.uniform(0.75, 0.95)
        ink = rng.uniform(0.05, 0.25)
        canvas = np.full((size, size), paper, np.float32)
        top, left = rng.integers(0, size - side + 1, 2)
        region = canvas[top:top + side, left:left + side]
        canvas[top:top + side, left:left + side] = region + (ink - region) * np.clip(digit, 0, 1)
        canvas += rng.normal(0, 0.02, canvas.shape).astype(np.float32)
        rgb = np.repeat((np.clip(canvas, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=2)
        rgb = np.clip(rgb.astype(np.int16) + np.array([6, 0, -8], np.int16), 0, 255).astype(np.uint8)  # warm light
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=int(rng.integers(60, 90)))
        out.append(buffer.getvalue())
    return out


def ood_sets(test_digits: np.ndarray, n: int = 1000, seed: int = 0,
             glyph_set: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """All the sets, n images each (glyphs: at most the fonts' glyphs), from the given test digits [>=n, 1, 28, 28];
    `glyph_set`: glyphs(n, seed) when the caller rendered them already."""
    digits = test_digits[:n]
    return {"uniform_noise": uniform_noise(n, seed), "gaussian_noise": gaussian_noise(n, seed),
            "blank": blank(n, seed), "constant": constant(n, seed), "inverted_digits": inverted_digits(digits),
            "glyphs": glyphs(n, seed) if glyph_set is None else glyph_set, "rotated_digits": rotated_digits(digits),
            "digit_pairs": digit_pairs(digits, seed)}
