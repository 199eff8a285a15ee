"""Batch rows and /explain answers agree for the same images and options (issue 26), for both shipped
families: `protoserve score --canonicalize --abstain --top-k 4 --pictures DIR --pictures-for all` on test
digits and photo-like JPEGs (dark ink on light paper, 300x300), against the answers of
inference/explanation.py, the code the service's /explain calls, run in process (a `bentoml serve`
would add a minute and answer through the same function). Labels, abstentions, prototype ids and
their order exactly; the numbers within float tolerance; each row's picture is the answer's picture.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scoring_helpers import png_bytes, read_rows

from inference.explanation import Explainer, explanation_picture
from inference.model import load_model
from inference.preprocess import to_input
from scoring.job import JobSpec
from scoring.run import run_scoring_job

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from benchmarks.ood_sets import photo_like  # noqa: E402

SHIPPED = ["prototypedl_mnist", "protopnet_mnist"]
DIGITS, PHOTOS, TOP_K = 20, 100, 4


@pytest.fixture(scope="module")
def labels(mnist_root) -> np.ndarray:
    gz = mnist_root / "t10k-labels-idx1-ubyte.gz"
    data = gzip.decompress(gz.read_bytes()) if gz.exists() else (mnist_root / "t10k-labels-idx1-ubyte").read_bytes()
    return np.frombuffer(data, np.uint8, offset=8)[:300].astype(int)


def class_folders(root: Path, files: dict[str, bytes], labels: list[int]) -> dict[str, bytes]:
    """Write each file into the sub-folder of its class (the rows' true_label); {input_id: bytes}."""
    written = {}
    for (name, data), label in zip(files.items(), labels, strict=True):
        path = root / str(label) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written[str(path)] = data
    return written


@pytest.mark.parametrize("shipped", SHIPPED)
def test_batch_rows_are_the_explain_answers(shipped, digits, labels, tmp_path):
    bundle = REPO / "models" / shipped / "bundle"
    plain = {f"digit{i:03d}.png": png_bytes(digits[i]) for i in range(DIGITS)}
    photos = dict(zip((f"photo{i:03d}.jpg" for i in range(PHOTOS)),
                      photo_like(digits[:PHOTOS, None] / 255.0, seed=0, size=300), strict=True))
    files = class_folders(tmp_path / "in", plain, list(labels[:DIGITS]))
    files |= class_folders(tmp_path / "in", photos, list(labels[:PHOTOS]))
    out = tmp_path / "rows.parquet"
    run_scoring_job(JobSpec(str(bundle), [str(tmp_path / "in")], out, top_k=TOP_K, canonicalize=True, abstain=True,
                            pictures=tmp_path / "pictures", pictures_for="all"), progress=False)
    rows = {r["input_id"]: r for r in read_rows(out)}
    assert set(rows) == set(files)

    explainer = Explainer(load_model(bundle, device="cpu"))
    spec = explainer.manifest.input
    for input_id, data in files.items():
        row = rows[input_id]
        x = to_input(data, spec, canonical=True)
        answer = explainer.explain(x, TOP_K, abstain=True)
        prediction = answer["prediction"]
        assert row["error"] is None
        assert (row["label"], row["class_name"], row["abstained"]) == \
               (prediction["label"], prediction["class_name"], prediction["abstained"]), input_id
        assert row["in_domain"] == prediction["in_domain"], input_id
        assert row["typicality"] == pytest.approx(prediction["typicality"], abs=1e-5)
        np.testing.assert_allclose(row["probabilities"], prediction["probabilities"], rtol=1e-4, atol=1e-6)
        assert row["prototype_ids"] == [p["id"] for p in answer["prototypes"]], input_id
        for column, field in (("prototype_distances", "distance"), ("prototype_similarities", "similarity"),
                              ("prototype_contributions", "contribution")):
            np.testing.assert_allclose(row[column], [p[field] for p in answer["prototypes"]], rtol=1e-4, atol=1e-5)
        drawn = np.asarray(Image.open(row["picture"]).convert("RGB"), np.int16)
        expected = np.asarray(explanation_picture(answer, x, explainer.manifest), np.int16)
        assert drawn.shape == expected.shape
        assert (np.abs(drawn - expected) > 0).mean() < 0.002, f"{input_id}: the picture differs from /explain's"

    # The photo-like uploads are scored the way /explain scores them: as well as over HTTP (>= 97%).
    photo_rows = [r for i, r in rows.items() if Path(i).suffix == ".jpg"]
    named = [r for r in photo_rows if not r["abstained"]]
    assert sum(r["label"] == r["true_label"] for r in photo_rows) / len(photo_rows) >= 0.97, \
        [(r["input_id"], r["label"], r["true_label"]) for r in photo_rows if r["label"] != r["true_label"]]
    assert len(named) >= 0.97 * len(photo_rows)


def test_pictures_for_errors_and_out_of_domain_only(digits, labels, tmp_path):
    """--pictures-for errors draws the rows whose prediction differs from the input's class (an IDX
    labels file beside the images), out-of-domain the rows judged out of domain; the rest have none."""
    from scoring_helpers import write_idx

    bundle = REPO / "models" / "prototypedl_mnist" / "bundle"
    n = 200
    noise = np.random.default_rng(0).integers(0, 256, (8, 28, 28)).astype(np.uint8)  # out of domain
    images = np.concatenate([digits[:n], noise])
    truth = np.concatenate([labels[:n], np.zeros(len(noise), int)])
    truth[:3] = (truth[:3] + 1) % 10  # three inputs whose labels file says another class: errors by construction
    write_idx(tmp_path / "t-images-idx3-ubyte", images)
    write_idx(tmp_path / "t-labels-idx1-ubyte", truth.astype(np.uint8))
    for which in ("errors", "out-of-domain"):
        out = tmp_path / f"{which}.parquet"
        run_scoring_job(JobSpec(str(bundle), [str(tmp_path / "t-images-idx3-ubyte")], out, pictures_for=which,
                                pictures=tmp_path / which), progress=False)
        rows = read_rows(out)
        assert [r["true_label"] for r in rows] == truth.tolist()
        wanted = [r["label"] != r["true_label"] if which == "errors" else r["in_domain"] is False for r in rows]
        assert [r["picture"] is not None for r in rows] == wanted
        assert sum(wanted) >= 3
        assert sorted(p.name for p in (tmp_path / which).iterdir()) == \
               sorted(f"{r['index']:08d}.png" for r in rows if r["picture"])
