"""`--engine ray` on a local Ray started here: the same output as the local engine, row for row."""

from __future__ import annotations

import numpy as np
import pytest
from scoring_helpers import png_bytes, read_rows, write_idx, write_parquet

from scoring.job import Job, JobSpec
from scoring.run import run_scoring_job

ray = pytest.importorskip("ray", reason="protoserve[batch] (ray[data]) is not installed")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_engine_equals_the_local_engine(local_ray, tiny_bundle, digits, tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i in range(20):
        (folder / f"{i:02d}.png").write_bytes(png_bytes(digits[i]))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    idx = write_idx(tmp_path / "images-idx3-ubyte.gz", digits, compress=True)
    parquet = write_parquet(tmp_path / "images.parquet", [png_bytes(d) for d in digits[:30]] + [None])
    inputs = [str(folder), str(idx), str(parquet)]

    local = tmp_path / "local.parquet"
    run_scoring_job(JobSpec(str(tiny_bundle), inputs, local, chunk_size=64), progress=False)
    on_ray = tmp_path / "ray.parquet"
    summary = run_scoring_job(JobSpec(str(tiny_bundle), inputs, on_ray, chunk_size=64, workers=2), engine="ray",
                      progress=False)
    assert summary.images == 21 + 300 + 31 and summary.failed == 2
    assert list(summary.nodes.values()) == [21 + 300 + 31]  # one node scored every image
    assert summary.line().endswith("on 1 Ray node")
    expected, got = read_rows(local), read_rows(on_ray)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert {k: v for k, v in a.items() if k != "probabilities"} == \
            {k: v for k, v in b.items() if k != "probabilities"}
        if b["probabilities"] is not None:
            np.testing.assert_allclose(a["probabilities"], b["probabilities"], atol=1e-6)


def test_ray_engine_resumes_a_job_the_local_engine_started(local_ray, tiny_bundle, digits, tmp_path):
    idx = write_idx(tmp_path / "images-idx3-ubyte", digits)
    spec = JobSpec(str(tiny_bundle), [str(idx)], tmp_path / "out.jsonl", chunk_size=50)
    job = Job(spec)
    job.start()
    for k in (0, 3):  # two chunks committed by a local run that was then killed
        job.commit(k, job.scorer.score(*job.read_inputs(k), infer=_session(tiny_bundle, job.scorer.features)))
    summary = run_scoring_job(spec, engine="ray", progress=False)
    assert summary.scored_now == 200
    reference = tmp_path / "reference.jsonl"
    run_scoring_job(JobSpec(str(tiny_bundle), [str(idx)], reference, chunk_size=50), progress=False)
    rows = read_rows(tmp_path / "out.jsonl")
    assert [r["index"] for r in rows] == list(range(300))
    assert [r["prototype_ids"] for r in rows] == [r["prototype_ids"] for r in read_rows(reference)]


def _session(bundle, features):
    from bundle.runtime import classify, open_session

    session, _ = open_session(bundle / "model.onnx", "cpu")
    return lambda x: classify(session, x, features)


def test_cli_joins_an_existing_cluster(local_ray, tiny_bundle, digits, tmp_path):
    """`protoserve score --engine ray --ray-address ADDRESS` runs on the Ray this test started."""
    from scoring_helpers import run_cli

    idx = write_idx(tmp_path / "images-idx3-ubyte", digits[:120])
    address = ray.get_runtime_context().gcs_address
    result = run_cli("score", "--model", str(tiny_bundle), "--input", str(idx), "--output", str(tmp_path / "o.jsonl"),
                     "--engine", "ray", "--ray-address", address, "--workers", "1", "--chunk-size", "50", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "120 images" in result.stdout
    run_scoring_job(JobSpec(str(tiny_bundle), [str(idx)], tmp_path / "local.jsonl"), progress=False)
    got, want = read_rows(tmp_path / "o.jsonl"), read_rows(tmp_path / "local.jsonl")
    assert [r["prototype_ids"] for r in got] == [r["prototype_ids"] for r in want]
    assert [r["input_id"] for r in got] == [r["input_id"] for r in want]
