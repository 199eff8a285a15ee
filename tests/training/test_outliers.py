"""The outlier data of outlier exposure (training/outliers.py): built from the installed wheels, kept
apart from the benchmark's glyph fonts, split by font between training and validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.ood_sets import font_files
from training.config import Config, ConfigError
from training.outliers import (
    DIGIT_LIKE,
    FONTPKG_FAMILIES,
    SOURCES,
    OutlierDataError,
    build_outliers,
    characters,
    fontpkg_files,
    licences,
    source_units,
    split_units,
)


def _family(path: Path) -> str:
    """A font file's family, as its name before the style: DejaVuSans-Bold -> dejavusans."""
    return path.stem.split("-")[0].split("[")[0].lower()


def test_outlier_fonts_and_benchmark_glyph_fonts_are_disjoint():
    outlier_files = {p.resolve() for family in FONTPKG_FAMILIES for p in fontpkg_files(family)}
    glyph_files = {p.resolve() for p in font_files()}
    assert outlier_files and glyph_files
    assert not outlier_files & glyph_files
    # nor the same family under another file name (the benchmark: DejaVu and Liberation)
    outlier_families = {_family(p) for p in outlier_files}
    glyph_families = {_family(p) for p in glyph_files}
    assert not outlier_families & glyph_families
    assert not any(name.startswith(("dejavu", "liberation", "arimo", "tinos", "cousine")) for name in outlier_families)


@pytest.mark.parametrize("family", ["dejavu-sans", "liberation-serif", "arimo"])
def test_the_benchmark_families_are_refused(family):
    with pytest.raises(OutlierDataError, match="never outlier data"):
        fontpkg_files(family)


@pytest.mark.parametrize("source", SOURCES)
def test_split_is_by_font_and_fixed(source):
    split = split_units(source, 0.25, seed=0)
    assert split["val"] and split["train"]
    assert not set(split["train"]) & set(split["val"])
    assert sorted(split["train"] + split["val"]) == source_units(source)
    assert split == split_units(source, 0.25, seed=0)
    assert split != split_units(source, 0.25, seed=1)


def test_built_sets_hold_no_font_of_the_other_part_and_repeat_with_the_seed():
    train = build_outliers(part="train", per_unit=2)
    val = build_outliers(part="val", per_unit=2)
    assert set(np.unique(train.units)).isdisjoint(np.unique(val.units))
    assert {u.split(":")[0] for u in train.units} == set(SOURCES) == {u.split(":")[0] for u in val.units}
    again = build_outliers(part="train", per_unit=2)
    np.testing.assert_array_equal(train.images, again.images)


def test_images_are_made_the_mnist_way():
    s = build_outliers(part="val", per_unit=3)
    assert s.images.shape[1:] == (1, 28, 28) and s.images.dtype == np.float32
    assert s.images.min() >= 0 and s.images.max() <= 1
    for x in s.images[:, 0]:
        rows, cols = np.flatnonzero(x.max(axis=1) > 0.05), np.flatnonzero(x.max(axis=0) > 0.05)
        assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 <= 21  # ink fitted into 20x20
        cy = (x.sum(axis=1) * np.arange(28)).sum() / x.sum()
        cx = (x.sum(axis=0) * np.arange(28)).sum() / x.sum()
        assert abs(cy - 14) < 1.5 and abs(cx - 14) < 1.5  # centred by mass, as MNIST


def test_no_digit_digit_like_letter_or_single_stroke_is_drawn():
    drawn = set(characters())
    assert not drawn & set("0123456789") and not drawn & DIGIT_LIKE and not drawn & set("/|\\()[]!'")
    assert set("AEKRxy#@") <= drawn


def test_each_source_records_its_licence():
    found = licences()
    assert found["Hershey-Fonts"].startswith("MIT") and found["animal-shape-mnist"] == "MIT"
    assert all(found[f"fontpkg-{f}"] in ("OFL-1.1", "Apache-2.0") for f in FONTPKG_FAMILIES)


def test_config_refuses_an_unknown_source():
    with pytest.raises(ConfigError, match="outlier_exposure.sources"):
        Config.from_dict({"outlier_exposure": {"weight": 1.0, "sources": ["dejavu"]}})
