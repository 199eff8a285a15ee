"""The explanation-quality report over HTTP: /metadata carries its figures, /prototypes each
prototype's own."""

from __future__ import annotations

import httpx

from bundle.manifest import read_bundle


def test_metadata_and_catalogue_expose_the_quality_report(server, tiny_bundle):
    quality = read_bundle(tiny_bundle).manifest.quality
    meta = httpx.get(f"{server}/metadata").json()
    assert meta["quality"]["figures"] == quality.model_dump(mode="json")["figures"]
    assert (meta["quality"]["split"], meta["quality"]["sample_size"], meta["quality"]["seed"]) == (
        "validation", quality.sample_size, quality.seed)
    assert "prototypes" not in meta["quality"]  # per prototype: the catalogue
    assert "stability" in meta["quality"]["not_applicable"]
    catalogue = httpx.get(f"{server}/prototypes").json()["prototypes"]
    assert [row["quality"] for row in catalogue] == [p.figures for p in quality.prototypes]
    assert all(0.0 <= row["quality"]["auroc"] <= 1.0 for row in catalogue)
