"""`protoserve score` on every input format, with bad inputs mixed in; JSON Lines; refusals; metrics."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from scoring_helpers import png_bytes, read_rows, run_cli, write_idx, write_parquet

from bundle.manifest import read_bundle, write_manifest
from scoring.job import JobError, JobSpec
from scoring.run import run_scoring_job


def score(tmp_path: Path, bundle: Path, inputs: list, name: str = "out.parquet", **kw) -> list[dict]:
    out = tmp_path / name
    run_scoring_job(JobSpec(str(bundle), [str(i) for i in inputs], out, **kw), progress=False)
    return read_rows(out)


def by_pixels(rows: list[dict]) -> list[tuple]:
    return [(r["label"], tuple(r["prototype_ids"])) for r in rows]


def test_every_format_gives_the_same_rows_for_the_same_digits(tiny_bundle, digits, tmp_path):
    n = 40
    images = digits[:n]
    folder = tmp_path / "pictures"
    (folder / "sub").mkdir(parents=True)
    for i in range(n):
        (folder / ("sub" if i % 2 else "") / f"{i:03d}.png").write_bytes(png_bytes(images[i]))
    idx = write_idx(tmp_path / "images-idx3-ubyte", images)
    idx_gz = write_idx(tmp_path / "images-idx3-ubyte.gz", images, compress=True)
    npy = tmp_path / "images.npy"
    np.save(npy, images)
    npz = tmp_path / "images.npz"
    np.savez_compressed(npz, images=images, labels=np.arange(n))  # labels (1-D) are not inputs
    parquet = write_parquet(tmp_path / "images.parquet", [png_bytes(im) for im in images])

    reference = score(tmp_path, tiny_bundle, [idx], "idx.parquet")
    assert [r["input_id"] for r in reference] == [f"{idx}#{i}" for i in range(n)]
    assert all(r["error"] is None for r in reference)
    for source in (idx_gz, npy, npz, parquet):
        rows = score(tmp_path, tiny_bundle, [source], f"{source.name}.out.parquet")
        assert len(rows) == n and all(r["error"] is None for r in rows)
        assert by_pixels(rows) == by_pixels(reference)
        np.testing.assert_allclose([r["probabilities"] for r in rows], [r["probabilities"] for r in reference],
                                   atol=1e-6)
    assert score(tmp_path, tiny_bundle, [npz], "npz.parquet")[3]["input_id"] == f"{npz}:images#3"
    # A folder is read in sorted path order: 000.png, 002.png, ..., then sub/001.png, ...
    rows = score(tmp_path, tiny_bundle, [folder], "folder.parquet")
    order = sorted(range(n), key=lambda i: ("sub/" if i % 2 else "") + f"{i:03d}.png")
    assert [r["input_id"] for r in rows] == [f"{folder}/{('sub/' if i % 2 else '')}{i:03d}.png" for i in order]
    assert by_pixels(rows) == [by_pixels(reference)[i] for i in order]


def test_bad_inputs_are_rows_with_errors_and_the_job_goes_on(tiny_bundle, digits, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a_good.png").write_bytes(png_bytes(digits[0]))
    (folder / "b_truncated.png").write_bytes(png_bytes(digits[1])[:60])
    (folder / "c_text.png").write_text("hello")
    (folder / "d_empty.jpg").write_bytes(b"")
    (folder / "e_good.jpg").write_bytes(png_bytes(digits[2], "JPEG"))
    (folder / ".hidden.png").write_bytes(b"skipped")
    wrong_size = tmp_path / "wrong_size.npy"
    np.save(wrong_size, np.zeros((3, 32, 32), np.uint8))
    parquet = write_parquet(tmp_path / "with_nulls.parquet", [png_bytes(digits[3]), None, b"\x89PNG\r\n\x1a\nxx"])
    truncated_idx = tmp_path / "truncated-idx3-ubyte"
    truncated_idx.write_bytes(write_idx(tmp_path / "full", digits[:4]).read_bytes()[:16 + 28 * 28 * 3 + 100])

    rows = score(tmp_path, tiny_bundle, [folder, wrong_size, parquet, truncated_idx], "mixed.jsonl")
    errors = {r["input_id"].split("/")[-1]: r["error"] for r in rows}
    assert len(rows) == 5 + 3 + 3 + 4 and [r["index"] for r in rows] == list(range(15))
    assert errors["a_good.png"] is None and errors["e_good.jpg"] is None
    assert errors["b_truncated.png"].startswith("corrupt_image")
    assert errors["c_text.png"].startswith("not_an_image") and errors["d_empty.jpg"].startswith("not_an_image")
    assert all(errors[f"wrong_size.npy#{i}"].startswith("wrong_shape") for i in range(3))
    assert errors["with_nulls.parquet#0"] is None and errors["with_nulls.parquet#1"].startswith("not_an_image")
    assert errors["with_nulls.parquet#2"].startswith("corrupt_image")
    assert [errors[f"truncated-idx3-ubyte#{i}"] is None for i in range(4)] == [True, True, True, False]
    for r in rows:
        assert (r["label"] is None) == (r["error"] is not None) == (r["probabilities"] is None)


def test_jsonl_and_parquet_hold_the_same_rows(tiny_bundle, digits, tmp_path):
    idx = write_idx(tmp_path / "images-idx3-ubyte", digits[:30])
    as_parquet = score(tmp_path, tiny_bundle, [idx], "o.parquet", chunk_size=7, top_k=4)
    as_jsonl = score(tmp_path, tiny_bundle, [idx], "o.jsonl", chunk_size=7, top_k=4)
    assert as_parquet == as_jsonl
    assert all(len(r["prototype_ids"]) == 4 for r in as_jsonl)


def test_changed_input_or_model_is_refused_unless_restart(tiny_bundle, digits, tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.png").write_bytes(png_bytes(digits[i]))
    out = tmp_path / "out.parquet"
    args = ["score", "--model", str(tiny_bundle), "--input", str(folder), "--output", str(out), "--quiet"]
    assert run_cli(*args).returncode == 0
    again = run_cli(*args)
    assert again.returncode == 0 and "already complete" in again.stdout

    (folder / "5.png").write_bytes(png_bytes(digits[5]))
    refused = run_cli(*args)
    assert refused.returncode == 2 and "the input changed" in refused.stderr and "--restart" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert len(read_rows(out)) == 5  # the earlier output is left as it was
    restarted = run_cli(*args, "--restart")
    assert restarted.returncode == 0, restarted.stderr
    assert len(read_rows(out)) == 6

    other = tmp_path / "other_bundle"
    shutil.copytree(tiny_bundle, other)
    manifest = read_bundle(other).manifest
    write_manifest(other, manifest.model_copy(update={"version": "0.1.1"}))
    with pytest.raises(JobError, match="the model changed"):
        run_scoring_job(JobSpec(str(other), [str(folder)], out), progress=False)

    theirs = tmp_path / "someone_elses.parquet"
    theirs.write_text("not ours")
    foreign = run_cli("score", "--model", str(tiny_bundle), "--input", str(folder), "--output", str(theirs))
    assert foreign.returncode == 2 and "not the output of this job" in foreign.stderr
    assert theirs.read_text() == "not ours"


def test_cli_errors_are_one_line(tiny_bundle, tmp_path):
    cases = [(["--input", str(tmp_path / "missing")], "no such file or folder"),
             (["--input", str(tiny_bundle / "manifest.json")], "not a folder, IDX file"),
             (["--input", str(tmp_path), "--output", str(tmp_path / "o.csv")], "must end in .parquet or .jsonl"),
             (["--input", str(tmp_path), "--top-k", "99"], "top_k is 99")]
    for extra, fragment in cases:
        args = ["score", "--model", str(tiny_bundle), "--output", str(tmp_path / "o.parquet"), *extra]
        result = run_cli(*args)
        assert result.returncode == 2, result.stderr
        assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    missing_model = run_cli("score", "--model", "nosuch:1.0", "--input", str(tmp_path), "--output",
                            str(tmp_path / "o.parquet"))
    assert missing_model.returncode == 2 and "nosuch:1.0" in missing_model.stderr


def test_ray_missing_is_one_clear_line(tiny_bundle, digits, tmp_path):
    import subprocess
    import sys

    idx = write_idx(tmp_path / "images-idx3-ubyte", digits[:3])
    code = ("import sys; sys.modules['ray'] = None; from cli.main import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, "score", "--model", str(tiny_bundle), "--input", str(idx),
                             "--output", str(tmp_path / "o.parquet"), "--engine", "ray", "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("protoserve score: error: --engine ray needs Ray Data: "
                                     "pip install 'protoserve[batch]' (ray[data])")


@pytest.fixture
def pushgateway(tmp_path):
    """A real Prometheus Pushgateway (Debian prometheus-pushgateway; `make test` installs it)."""
    binary = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")
    if binary is None:
        pytest.skip("prometheus-pushgateway not installed (make pushgateway)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/-/ready", timeout=1)
            break
        except OSError:
            assert time.monotonic() < deadline and process.poll() is None, "pushgateway did not start"
            time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(10)


def sample(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text: `name{...labels...} value` (labels: a substring)."""
    for line in text.splitlines():
        if line.startswith(name + " ") or (line.startswith(name + "{") and labels in line):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in:\n{text}")


def test_job_metrics_textfile_and_pushgateway(tiny_bundle, digits, tmp_path, pushgateway):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.png").write_bytes(png_bytes(digits[i]))
    (folder / "bad.png").write_text("nope")
    prom = tmp_path / "protoserve_score.prom"
    args = ["score", "--model", str(tiny_bundle), "--input", str(folder), "--output", str(tmp_path / "o.parquet"),
            "--metrics-file", str(prom), "--pushgateway", pushgateway, "--quiet"]
    group = 'job="protoserve_score",output="o.parquet"'

    def gateway() -> str:
        return urllib.request.urlopen(f"{pushgateway}/metrics", timeout=10).read().decode()

    ok = run_cli(*args)
    assert ok.returncode == 0, ok.stderr
    text = prom.read_text()
    assert sample(text, "protoserve_batch_images_total", 'status="scored"') == 6
    assert sample(text, "protoserve_batch_images_total", 'status="failed"') == 1
    assert sample(text, "protoserve_batch_duration_seconds") > 0
    last_success = sample(text, "protoserve_batch_last_success_timestamp_seconds")
    assert abs(last_success - time.time()) < 120
    pushed = gateway()
    assert sample(pushed, "protoserve_batch_images_total", 'status="failed"') == 1
    assert sample(pushed, "protoserve_batch_images_total", 'status="scored"') == 6
    assert group in next(line for line in pushed.splitlines() if line.startswith("protoserve_batch_images_total"))
    assert sample(pushed, "protoserve_batch_last_success_timestamp_seconds", group) == pytest.approx(last_success)

    (folder / "new.png").write_bytes(png_bytes(digits[7]))  # a changed input: this run fails
    failed = run_cli(*args)
    assert failed.returncode == 2
    # The failed run replaced the duration only: the last success time (and the counts) are kept.
    pushed = gateway()
    assert sample(pushed, "protoserve_batch_last_success_timestamp_seconds", group) == pytest.approx(last_success)
    assert sample(pushed, "protoserve_batch_images_total", 'status="scored"') == 6
    assert sample(prom.read_text(), "protoserve_batch_last_success_timestamp_seconds") == last_success


def test_job_plan_is_atomic_json(tiny_bundle, digits, tmp_path):
    idx = write_idx(tmp_path / "images-idx3-ubyte", digits[:10])
    out = tmp_path / "o.parquet"
    run_scoring_job(JobSpec(str(tiny_bundle), [str(idx)], out, chunk_size=4), progress=False)
    plan = json.loads((tmp_path / "o.parquet.job" / "job.json").read_text())
    assert plan["chunks"] == 3 and plan["inputs"]["items"] == 10
    assert sorted(p.name for p in (tmp_path / "o.parquet.job").iterdir()) == ["complete.json", "job.json"]


def test_parquet_struct_column_chosen_by_name(tiny_bundle, digits, tmp_path):
    """A Hugging Face-style image column (struct of bytes and path), picked with image_column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pictures = [{"bytes": png_bytes(d), "path": f"{i}.png"} for i, d in enumerate(digits[:5])]
    table = pa.table({"thumb": pa.array([b"x"] * 5, pa.binary()), "img": pictures})
    path = tmp_path / "hf.parquet"
    pq.write_table(table, path)
    rows = score(tmp_path, tiny_bundle, [path], "hf_out.parquet", image_column="img")
    assert all(r["error"] is None for r in rows)
    first_binary = score(tmp_path, tiny_bundle, [path], "thumb_out.parquet")
    assert all(r["error"].startswith("not_an_image") for r in first_binary)
    with pytest.raises(Exception, match="no column 'nope'"):
        score(tmp_path, tiny_bundle, [path], "x.parquet", image_column="nope")


def test_model_by_store_tag(tiny_bundle, digits, tmp_path, monkeypatch):
    from bundle.store import import_bundle

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    stored = import_bundle(tiny_bundle)
    idx = write_idx(tmp_path / "images-idx3-ubyte", digits[:8])
    by_tag = score(tmp_path, stored.tag, [idx], "tag.parquet")
    by_path = score(tmp_path, tiny_bundle, [idx], "path.parquet")
    assert by_tag == by_path and by_tag[0]["model_name"] == stored.tag.split(":")[0]


def test_output_inside_the_input_folder_is_not_an_input(tiny_bundle, digits, tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(png_bytes(digits[i]))
    args = ["score", "--model", str(tiny_bundle), "--input", str(folder), "--output", str(folder / "scores.jsonl"),
            "--quiet", "--chunk-size", "2"]
    assert run_cli(*args).returncode == 0
    again = run_cli(*args)
    assert again.returncode == 0 and "already complete" in again.stdout, again.stderr
    assert [r["input_id"].rsplit("/", 1)[1] for r in read_rows(folder / "scores.jsonl")] == ["0.png", "1.png", "2.png"]


def test_the_job_runs_numpy_blas_on_one_thread(tiny_bundle, digits, tmp_path):
    """A job's BLAS threads would spin beside its sessions (protoserve/blas.py): the job limits them to one."""
    import os
    import sys

    idx = write_idx(tmp_path / "images-idx3-ubyte", digits[:3])
    code = ("import json, sys, numpy; from threadpoolctl import threadpool_info; from cli.main import main\n"
            "def blas(): return [p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas']\n"
            "before = blas(); main(sys.argv[1:]); print(json.dumps([before, blas()]))")
    result = subprocess.run([sys.executable, "-c", code, "score", "--model", str(tiny_bundle), "--input", str(idx),
                             "--output", str(tmp_path / "o.parquet"), "--quiet", "--workers", "2"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OPENBLAS_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr
    before, after = json.loads(result.stdout.strip().splitlines()[-1])
    assert before == [2] and after == [1]
