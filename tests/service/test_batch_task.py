"""The /score_batch async task end to end against a real `bentoml serve`: submit, status, get; the
same rows as `protoserve score`; size limits; server-side paths never read."""

from __future__ import annotations

import base64
import io
import json
import re
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from scoring.job import JobSpec
from scoring.run import run_scoring_job
from service.score_task import MAX_TASK_IMAGES

pytestmark = pytest.mark.slow


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((pixels[0] * 255).round().astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def digits(tiny_bundle) -> np.ndarray:
    with np.load(tiny_bundle / "probe.npz") as probe:
        return probe["input.image"]


def run_task(url: str, **request) -> dict:
    submitted = httpx.post(f"{url}/score_batch/submit", timeout=30, **request)
    assert submitted.status_code == 200, submitted.text
    task_id = submitted.json()["task_id"]
    deadline = time.monotonic() + 60
    while True:
        status = httpx.get(f"{url}/score_batch/status", params={"task_id": task_id}, timeout=10).json()
        if status["status"] != "in_progress":
            break
        assert time.monotonic() < deadline, "task still in progress after 60 s"
        time.sleep(0.2)
    assert status["status"] == "completed", status
    result = httpx.get(f"{url}/score_batch/get", params={"task_id": task_id}, timeout=30)
    assert result.status_code == 200, result.text
    return result.json()


def scrape_batch_images(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^protoserve_batch_images_total\{status="(\w+)"\} (\S+)$', text, re.MULTILINE)}


def test_task_returns_the_rows_of_protoserve_score(server, tiny_bundle, digits, tmp_path):
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i in range(6):
        (pictures / f"{i}.png").write_bytes(png(digits[i]))
    run_scoring_job(JobSpec(str(tiny_bundle), [str(pictures)], tmp_path / "cli.jsonl", top_k=2), progress=False)
    cli_rows = [json.loads(line) for line in (tmp_path / "cli.jsonl").read_text().splitlines()]
    before = scrape_batch_images(server)

    images = [base64.b64encode(png(digits[i])).decode() for i in range(6)]
    answer = run_task(server, json={"images": [*images, "not base64!", digits[0].tolist()], "top_k": 2})
    assert answer["images"] == 8 and answer["failed"] == 1
    rows = answer["rows"]
    assert [r["input_id"] for r in rows] == [f"images[{i}]" for i in range(8)]
    for got, want in zip(rows[:6], cli_rows, strict=True):
        floats = ("probabilities", "prototype_distances", "prototype_similarities", "prototype_contributions")
        assert {k: v for k, v in got.items() if k not in ("input_id", *floats)} == \
            {k: v for k, v in want.items() if k not in ("input_id", *floats)}
        np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-5)
        for key in floats[1:]:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6)
    assert rows[6]["error"].startswith("bad_base64") and rows[6]["label"] is None
    assert rows[7]["error"] is None and rows[7]["label"] is not None
    after = scrape_batch_images(server)
    assert after.get("scored", 0) - before.get("scored", 0) == 7
    assert after.get("failed", 0) - before.get("failed", 0) == 1


def test_task_takes_multipart_uploads(server, digits):
    files = [("images", (f"{i}.png", png(digits[i]), "image/png")) for i in range(3)]
    files.append(("images", ("broken.png", b"\x89PNG\r\n\x1a\nbroken", "image/png")))
    answer = run_task(server, files=files, data={"top_k": "1"})
    assert [r["error"] is None for r in answer["rows"]] == [True, True, True, False]
    assert all(len(r["prototype_ids"]) == 1 for r in answer["rows"][:3])


def test_task_never_reads_server_side_paths(server, tiny_bundle):
    names = ["/etc/passwd", str(tiny_bundle / "prototypes" / "0.png"), "file:///etc/hostname",
             str(tiny_bundle / "probe.npz")]
    answer = run_task(server, json={"images": names})
    assert answer["failed"] == len(names)
    for row in answer["rows"]:
        assert row["label"] is None and row["error"].split(":")[0] in ("bad_base64", "not_an_image")
        assert "root:" not in row["error"]


@pytest.mark.parametrize("body, status, reason", [
    ({"images": [[0.0]] * (MAX_TASK_IMAGES + 1)}, 413, "batch_too_large"),
    ({"images": []}, 400, "empty_batch"),
    ({"images": "abc"}, 400, "wrong_type"),
    ({}, 400, "missing_field"),
    ({"images": ["x"], "top_k": 0}, 400, "top_k_out_of_range"),
    ({"images": ["x"], "top_k": "3"}, 400, "wrong_type"),
])
def test_submission_refused_with_a_4xx(server, body, status, reason):
    r = httpx.post(f"{server}/score_batch/submit", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["reason"] == reason
    assert r.json()["model"] == {"name": "tiny-prototypedl", "version": "0.1.0"}


def test_oversized_body_refused(server):
    r = httpx.post(f"{server}/score_batch/submit", content=b"{" + b" " * (9 * 1024 * 1024) + b"}",
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413


def test_unknown_task_id(server):
    assert httpx.get(f"{server}/score_batch/status", params={"task_id": "nope"}, timeout=10).status_code == 404
