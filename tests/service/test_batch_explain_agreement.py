"""`protoserve score` rows against real /explain answers over HTTP (the tiny bundle's `bentoml serve`,
two workers), with /explain's options in both: canonicalize, abstain, top_k. The in-process check of
both shipped families is tests/scoring/test_explain_agreement.py; this one shows the service answers
through the same code."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from scoring.job import JobSpec
from scoring.run import run_scoring_job

pytestmark = pytest.mark.slow


def photo(digit: np.ndarray, shift: int) -> bytes:
    """A digit as dark ink on light paper, larger and off centre (a photo-like JPEG)."""
    paper = np.full((120, 120), 230, np.uint8)
    big = np.asarray(Image.fromarray((digit * 255).astype(np.uint8)).resize((84, 84)), np.uint8)
    paper[20 + shift:104 + shift, 10:94] -= (big * 0.8).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(paper).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def test_score_rows_are_the_services_explain_answers(server, tiny_bundle, tmp_path):
    import pyarrow.parquet as pq

    with np.load(tiny_bundle / "probe.npz") as probe:
        digits = probe["input.image"][:, 0]
    files = {}
    for i, d in enumerate(digits):
        files[f"photo{i}.jpg"] = photo(d, i % 10)
        noise = np.random.default_rng(i).integers(0, 256, (28, 28)).astype(np.uint8)  # some out of domain
        buffer = io.BytesIO()
        Image.fromarray(noise).save(buffer, format="PNG")
        files[f"noise{i}.png"] = buffer.getvalue()
    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    abstained = 0
    for canonicalize in (True, False):  # as uploaded, the photos are unlike the training digits: abstentions
        out = tmp_path / f"rows-{canonicalize}.parquet"
        run_scoring_job(JobSpec(str(tiny_bundle), [str(folder)], out, top_k=2, canonicalize=canonicalize,
                                abstain=True), progress=False)
        rows = {r["input_id"].rsplit("/", 1)[1]: r for r in pq.read_table(out).to_pylist()}
        for name, data in files.items():
            body = {"image": base64.b64encode(data).decode(), "top_k": 2, "abstain": True,
                    "canonicalize": canonicalize}
            answer = httpx.post(f"{server}/explain", json=body, timeout=30).json()
            row, prediction = rows[name], answer["prediction"]
            assert (row["label"], row["abstained"], row["in_domain"]) == \
                   (prediction["label"], prediction["abstained"], prediction["in_domain"]), name
            assert row["prototype_ids"] == [p["id"] for p in answer["prototypes"]], name
            np.testing.assert_allclose(row["prototype_distances"], [p["distance"] for p in answer["prototypes"]],
                                       rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(row["probabilities"], prediction["probabilities"], rtol=1e-4, atol=1e-6)
            assert row["typicality"] == pytest.approx(prediction["typicality"], abs=1e-5)
            abstained += row["abstained"]
    assert abstained > 0  # the abstention path was exercised
