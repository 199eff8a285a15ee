"""Outlier data for outlier exposure (docs/outlier_exposure.md): non-digit drawings made the MNIST way,
built at run time from data that ships inside installed wheels (the `outliers` extra of pyproject.toml);
nothing is downloaded and no image is committed.

Sources (each image records the font or class it came from, its *source unit*):
    hershey         Hershey-Fonts (MIT): vector stroke fonts drawn as pen strokes of random width and
                    slant (three pens per character), so they look written, not typeset; one unit per
                    font ("markers" is left out: circles and squares are drawings of a 0)
    animal_shapes   animal-shape-mnist (MIT): 10,000 28x28 animal silhouettes, read from the gzipped
                    pickle inside the wheel (its loader imports TensorFlow); one unit per animal class
    fontpkg         fontpkg-* TrueType families (OFL-1.1 / Apache-2.0), FONTPKG_FAMILIES; one unit per family

Letters drawn like a digit (O o I l i Z z S s B b g q D G), digits and single strokes (/ | \\ ( ) [ ] ! ')
are never drawn: made the MNIST way they are digits, and pushing them away would teach the model to
doubt real 0s and 1s. Every image is made as the benchmark's glyphs and MNIST's digits are (light ink on
dark, ink fitted into 20x20, centred by its centre of mass in 28x28: inference/canonical.py).

The split between training and validation is by source unit (font, family, animal class), fixed by a
seed: validation measures fonts and animals the model never saw. The benchmark's own glyph fonts
(DejaVu and Liberation, `make bench-ood`) are refused by name here, and so are the families Liberation
was made from (Arimo, Tinos, Cousine: the same outlines).
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import pickle
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from bundle.manifest import CanonicalForm
from inference.canonical import canonicalize
from protoserve.errors import ProtoserveError

MNIST_FORM = CanonicalForm(ink="light_on_dark", box=20, centre="mass")
SOURCES = ("hershey", "animal_shapes", "fontpkg")
DIGIT_LIKE = set("OoIliZzSsBbgqDG")
STROKES = set("/|\\()[]!'-_`,.")
SYMBOLS = "+*=#@&%$?<>{}~^;:\""
# The benchmark's glyph fonts and the families with their outlines: never outlier data.
FORBIDDEN_FAMILIES = ("dejavu", "liberation", "arimo", "tinos", "cousine")
HERSHEY_LEFT_OUT = ("markers",)
HERSHEY_PENS = 3  # each character drawn with three pens (width and slant drawn from the seed)
# The fontpkg-* distributions used (the `outliers` extra installs exactly these).
FONTPKG_FAMILIES = ("caveat", "dancing-script", "fira-sans", "ibm-plex-serif", "indie-flower", "kalam", "lora",
                    "merriweather", "noto-sans", "noto-serif", "permanent-marker", "roboto", "roboto-mono",
                    "shadows-into-light")
ANIMAL_DATA = ("animal_shape_mnist", "data/Animal Shape/animal_data_version_3.gz")


class OutlierDataError(ProtoserveError):
    pass


@dataclass
class OutlierSet:
    """Outlier images [N, 1, 28, 28] float32 in [0, 1], each image's source ("hershey:futural",
    "fontpkg:caveat", "animal_shapes:3") and what it shows (a character, or the animal class)."""

    images: np.ndarray
    units: np.ndarray
    content: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, mask: np.ndarray) -> OutlierSet:
        return OutlierSet(self.images[mask], self.units[mask], self.content[mask])


def characters() -> str:
    """The characters drawn from every font: letters not drawn like a digit, and symbols that are not
    single strokes."""
    letters = string.ascii_uppercase + string.ascii_lowercase
    return "".join(c for c in letters + SYMBOLS if c not in DIGIT_LIKE and c not in STROKES)


def _missing(package: str) -> OutlierDataError:
    return OutlierDataError(f"outlier data needs the package {package!r}, which is not installed "
                            "(pip install -e '.[outliers]', or `make setup`)")


# -- Hershey stroke fonts ----------------------------------------------------------------------------
def hershey_fonts() -> list[str]:
    try:
        from HersheyFonts import HersheyFonts  # noqa: PLC0415 (optional data package, see _missing)
    except ImportError:
        raise _missing("Hershey-Fonts") from None
    return sorted(n for n in HersheyFonts().default_font_names if n not in HERSHEY_LEFT_OUT)


def _hershey(fonts: list[str], rng: np.random.Generator, per_unit: int | None) -> list[tuple]:
    from HersheyFonts import HersheyFonts  # noqa: PLC0415

    out = []
    for name in fonts:
        font = HersheyFonts()
        font.load_default_font(name)
        chars = _chosen(characters(), rng, per_unit)
        for ch in chars:
            strokes = [s for s in font.strokes_for_text(ch) if len(s) > 0]
            for _ in range(HERSHEY_PENS if strokes else 0):
                image = _draw_strokes(strokes, width=float(rng.uniform(0.08, 0.18)),
                                      slant=float(rng.uniform(-0.25, 0.25)))
                if image is not None:
                    out.append((image, f"hershey:{name}", ch))
    return out


def _draw_strokes(strokes: list, width: float, slant: float, size: int = 160) -> np.ndarray | None:
    """Pen strokes (lists of (x, y), y down) fitted into a size x size canvas, drawn with a round pen
    `width` times the glyph's longer side, sheared by `slant`."""
    points = np.array([p for s in strokes for p in s], np.float64)
    points[:, 0] += slant * points[:, 1]
    lo, hi = points.min(axis=0), points.max(axis=0)
    span = float(max(hi - lo))
    if span <= 0:
        return None
    scale = 100.0 / span
    pen = max(2, int(round(width * 100)))
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    offset = (size - (hi - lo) * scale) / 2
    for stroke in strokes:
        xy = np.array(stroke, np.float64)
        xy[:, 0] += slant * xy[:, 1]
        xy = (xy - lo) * scale + offset
        pts = [tuple(p) for p in xy]
        if len(pts) > 1:
            draw.line(pts, fill=255, width=pen, joint="curve")
        for x, y in pts:  # round caps and joints
            draw.ellipse((x - pen / 2, y - pen / 2, x + pen / 2, y + pen / 2), fill=255)
    pixels = np.asarray(canvas, np.float32) / 255.0
    return canonicalize(pixels, MNIST_FORM, 28, 28) if pixels.max() > 0 else None


# -- fontpkg TrueType families -----------------------------------------------------------------------
def fontpkg_files(family: str) -> list[Path]:
    """The .ttf files of the installed fontpkg-<family> distribution."""
    if any(bad in family.lower() for bad in FORBIDDEN_FAMILIES):
        raise OutlierDataError(f"fontpkg-{family}: the benchmark's glyph fonts (or their outlines) are never "
                               "outlier data")
    module = "fontpkg_" + family.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(f"fontpkg-{family}")
    return sorted(Path(next(iter(spec.submodule_search_locations))).rglob("*.ttf"))


def _fontpkg(families: list[str], rng: np.random.Generator, per_unit: int | None) -> list[tuple]:
    out = []
    for family in families:
        faces = []
        for path in fontpkg_files(family):
            font = ImageFont.truetype(str(path), 96)
            try:  # a variable font: its named instances (Light, Regular, Bold, ...)
                names = font.get_variation_names()
            except OSError:
                names = []
            faces += [(path, name) for name in names] or [(path, None)]
        jobs = [(face, ch) for face in faces for ch in characters()]
        loaded = {}
        for i in _chosen_indices(len(jobs), rng, per_unit):
            (path, instance), ch = jobs[i]
            if (path, instance) not in loaded:
                loaded[path, instance] = ImageFont.truetype(str(path), 96)
                if instance is not None:
                    loaded[path, instance].set_variation_by_name(instance)
            font = loaded[path, instance]
            canvas = Image.new("L", (160, 160), 0)
            ImageDraw.Draw(canvas).text((80, 80), ch, fill=255, font=font, anchor="mm")
            pixels = np.asarray(canvas, np.float32) / 255.0
            if pixels.max() > 0:
                out.append((canonicalize(pixels, MNIST_FORM, 28, 28), f"fontpkg:{family}", ch))
    return out


# -- animal silhouettes ------------------------------------------------------------------------------
def animal_shapes() -> tuple[np.ndarray, np.ndarray]:
    """The wheel's 10,000 silhouettes [N, 28, 28] uint8 and their classes [N], read from its data files."""
    spec = importlib.util.find_spec(ANIMAL_DATA[0])
    if spec is None or not spec.submodule_search_locations:
        raise _missing("animal-shape-mnist")
    folder = Path(next(iter(spec.submodule_search_locations)))
    data_file = folder / ANIMAL_DATA[1]
    with gzip.open(data_file, "rb") as f:
        images = pickle.load(f)  # noqa: S301 (the installed wheel's own data file)
    with gzip.open(data_file.with_name(data_file.name.replace("data", "label")), "rb") as f:
        labels = pickle.load(f)  # noqa: S301
    return np.asarray(images, np.uint8), np.asarray(labels, np.int64)


def _animals(classes: list[int], rng: np.random.Generator, per_unit: int | None) -> list[tuple]:
    images, labels = animal_shapes()
    out = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        for i in idx[_chosen_indices(len(idx), rng, per_unit)]:
            out.append((canonicalize(images[i] / 255.0, MNIST_FORM, 28, 28), f"animal_shapes:{c}", f"animal {c}"))
    return out


# -- the split and the set ---------------------------------------------------------------------------
def source_units(source: str) -> list[str]:
    """Every unit (font, family, class) of a source, sorted."""
    if source == "hershey":
        return hershey_fonts()
    if source == "fontpkg":
        return sorted(FONTPKG_FAMILIES)
    if source == "animal_shapes":
        return [str(c) for c in range(10)]
    raise OutlierDataError(f"unknown outlier source {source!r}; expected one of {', '.join(SOURCES)}")


def split_units(source: str, val_share: float, seed: int) -> dict[str, list[str]]:
    """{"train": units, "val": units}: a seeded choice of round(val_share * n) units (at least one)
    held out for validation."""
    units = source_units(source)
    n_val = min(len(units) - 1, max(1, round(val_share * len(units))))
    order = np.random.default_rng([seed, SOURCES.index(source)]).permutation(len(units))
    val = sorted(units[i] for i in order[:n_val])
    return {"train": [u for u in units if u not in val], "val": val}


def build_outliers(sources: list[str] | tuple[str, ...] = SOURCES, part: str = "train", val_share: float = 0.25,
                   seed: int = 0, per_unit: int | None = None) -> OutlierSet:
    """The outlier images of `part` ("train" | "val") from `sources`; per_unit caps the images of each
    unit (tests). Same arguments, same images."""
    if part not in ("train", "val"):
        raise OutlierDataError(f"part must be 'train' or 'val', got {part!r}")
    rows = []
    for source in sources:
        units = split_units(source, val_share, seed)[part]
        rng = np.random.default_rng([seed, SOURCES.index(source), part == "val"])
        if source == "hershey":
            rows += _hershey(units, rng, per_unit)
        elif source == "fontpkg":
            rows += _fontpkg(units, rng, per_unit)
        else:
            rows += _animals([int(u) for u in units], rng, per_unit)
    if not rows:
        raise OutlierDataError(f"no outlier images from {', '.join(sources)} ({part})")
    images, units, content = zip(*rows, strict=True)
    return OutlierSet(np.stack(images)[:, None].astype(np.float32), np.array(units), np.array(content))


def licences() -> dict[str, str]:
    """Each installed distribution the outlier data comes from -> its licence, from the wheel's metadata."""
    names = ["Hershey-Fonts", "animal-shape-mnist", *(f"fontpkg-{f}" for f in FONTPKG_FAMILIES)]
    out = {}
    for name in names:
        try:
            meta = importlib.metadata.metadata(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        out[name] = meta.get("License-Expression") or meta.get("License") or "unknown"
    return out


def _chosen(items: str, rng: np.random.Generator, n: int | None) -> list[str]:
    return [items[i] for i in _chosen_indices(len(items), rng, n)]


def _chosen_indices(total: int, rng: np.random.Generator, n: int | None) -> np.ndarray:
    if n is None or n >= total:
        return np.arange(total)
    return np.sort(rng.choice(total, n, replace=False))
