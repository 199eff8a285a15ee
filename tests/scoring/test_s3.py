"""`protoserve score` with s3:// inputs and outputs, against a real S3 server (SeaweedFS, tests/conftest.py):
the rows are those of the same job on local paths, the job's state lives in the bucket so a run killed
mid-job resumes from it (on any machine) without a duplicate, and a wrong bucket or endpoint is one line."""

from __future__ import annotations

import io
import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
from scoring_helpers import png_bytes, read_rows, run_cli, write_idx

from protoserve.local_processes import free_port
from protoserve.settings import variable
from scoring.bucket import ObjectStoreError
from scoring.job import Job, JobSpec, staging
from scoring.local_engine import run_local
from scoring.run import run_scoring_job

IMAGES = 60
CHUNK = 16  # 61 inputs: 4 chunks


@pytest.fixture
def pictures(digits, mnist_root, bucket, s3, tmp_path, monkeypatch) -> tuple[str, str]:
    """(a local folder, the same files under s3://<bucket>/uploads): MNIST digits in class sub-folders
    ("<label>/<i>.png", so rows have a true_label) and one broken file."""
    monkeypatch.setenv(variable("cache_dir"), str(tmp_path / "cache"))  # the staging folder of s3:// jobs
    labels = _test_labels(mnist_root)[:IMAGES]
    folder = tmp_path / "uploads"
    client = s3.client()
    files = {f"{labels[i]}/{i:03d}.png": png_bytes(digits[i]) for i in range(IMAGES)}
    files["broken.png"] = b"\x89PNG\r\n\x1a\n broken"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        client.put_object(Bucket=bucket, Key=f"uploads/{name}", Body=data)
    return str(folder), f"s3://{bucket}/uploads"


def _test_labels(root) -> list[int]:
    import gzip

    plain = root / "t10k-labels-idx1-ubyte"
    data = plain.read_bytes() if plain.exists() else gzip.decompress(plain.with_name(plain.name + ".gz").read_bytes())
    return list(data[8:])


def bucket_rows(s3, bucket: str, key: str) -> list[dict]:
    return pq.read_table(io.BytesIO(s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())).to_pylist()


def keys(s3, bucket: str, prefix: str) -> list[str]:
    return sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []))


def comparable(rows: list[dict], input_root: str) -> list[dict]:
    """The rows without the input's root in their ids (a folder path here, an s3:// URL there)."""
    return [{**r, "input_id": r["input_id"].removeprefix(input_root.rstrip("/") + "/")} for r in rows]


def test_s3_inputs_and_output_give_the_rows_of_local_paths(tiny_bundle, pictures, bucket, s3, tmp_path):
    folder, url = pictures
    local = tmp_path / "local.parquet"
    run_scoring_job(JobSpec(str(tiny_bundle), [folder], local, chunk_size=CHUNK, workers=2), progress=False)
    output = f"s3://{bucket}/scores/run-1.parquet"
    summary = run_scoring_job(JobSpec(str(tiny_bundle), [url], output, chunk_size=CHUNK, workers=2), progress=False)

    assert (summary.images, summary.failed, summary.output) == (IMAGES + 1, 1, output)
    expected = comparable(read_rows(local), folder)
    rows = comparable(bucket_rows(s3, bucket, "scores/run-1.parquet"), url)
    assert rows == expected  # labels, ids, true labels, probabilities, the broken file's error: all of it
    assert sum(r["true_label"] is not None for r in rows) == IMAGES
    assert [r["input_id"] for r in rows][:2] == ["0/003.png", "0/010.png"]  # key order, as a folder's path order
    # Done: the output and the job's record in the bucket, the chunks dropped; nothing left staged locally
    # but the record.
    assert keys(s3, bucket, "scores/") == ["scores/run-1.parquet", "scores/run-1.parquet.job/complete.json",
                                          "scores/run-1.parquet.job/job.json"]
    stage = staging(output)
    assert sorted(p.name for p in stage.with_name(stage.name + ".job").iterdir()) == ["complete.json", "job.json"]

    again = run_scoring_job(JobSpec(str(tiny_bundle), [url], output, chunk_size=CHUNK, workers=2), progress=False)
    assert again.already_complete and (again.images, again.failed) == (IMAGES + 1, 1)


def test_an_idx_object_and_its_labels_give_the_rows_of_the_files(tiny_bundle, digits, mnist_root, bucket, s3,
                                                                 tmp_path, monkeypatch):
    """One object of many inputs (IDX, gzipped) is downloaded once into the cache and read like the file, the
    IDX labels object beside it included (true_label)."""
    import gzip
    import struct

    monkeypatch.setenv(variable("cache_dir"), str(tmp_path / "cache"))
    images = write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", digits[:100], compress=True)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(struct.pack(">II", 0x0801, 100) + bytes(_test_labels(mnist_root)[:100])))
    for path in (images, labels):
        s3.client().put_object(Bucket=bucket, Key=f"mnist/{path.name}", Body=path.read_bytes())
    local = tmp_path / "local.parquet"
    run_scoring_job(JobSpec(str(tiny_bundle), [str(images)], local, chunk_size=CHUNK), progress=False)
    url = f"s3://{bucket}/mnist/{images.name}"
    output = tmp_path / "from-s3.parquet"
    run_scoring_job(JobSpec(str(tiny_bundle), [url], output, chunk_size=CHUNK), progress=False)
    rows = read_rows(output)
    assert [{**r, "input_id": r["input_id"].split("#")[1]} for r in rows] == \
        [{**r, "input_id": r["input_id"].split("#")[1]} for r in read_rows(local)]
    assert [r["true_label"] for r in rows] == _test_labels(mnist_root)[:100]
    assert rows[0]["input_id"] == f"{url}#0"


def test_a_job_killed_mid_way_resumes_from_the_bucket(tiny_bundle, pictures, bucket, s3, tmp_path):
    """Two chunks committed, then the run dies; its machine's staging folder is lost too (another pod runs
    it again). A chunk file staged but never uploaded (killed between the two) is not committed: redone.
    The re-run scores only the other chunks, and every input is in the output once."""
    folder, url = pictures
    output = f"s3://{bucket}/scores/resumed.jsonl"
    reference = tmp_path / "reference.jsonl"
    run_scoring_job(JobSpec(str(tiny_bundle), [folder], reference, chunk_size=CHUNK, workers=2), progress=False)

    spec = JobSpec(str(tiny_bundle), [url], output, chunk_size=CHUNK, workers=2)
    job = Job(spec)
    assert not job.start()
    run_local(job, [0, 2], lambda n: None)  # committed: chunks 0 and 2; then the process is gone
    assert keys(s3, bucket, "scores/resumed.jsonl.job/") == [f"scores/resumed.jsonl.job/{n}" for n in
                                                             ("chunk-000000.arrow", "chunk-000002.arrow", "job.json")]
    shutil.rmtree(job.dir)
    job.dir.mkdir()
    (job.dir / "chunk-000001.arrow").write_bytes(b"staged, never uploaded")

    summary = run_scoring_job(spec, progress=False)
    assert summary.scored_now == (IMAGES + 1) - 2 * CHUNK
    text = s3.client().get_object(Bucket=bucket, Key="scores/resumed.jsonl")["Body"].read().decode()
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["index"] for r in rows] == list(range(IMAGES + 1))
    assert comparable(rows, url) == comparable(read_rows(reference), folder)
    assert keys(s3, bucket, "scores/resumed.jsonl.job/") == ["scores/resumed.jsonl.job/complete.json",
                                                             "scores/resumed.jsonl.job/job.json"]


def test_an_s3_output_of_another_job_is_refused(tiny_bundle, pictures, bucket, s3):
    folder, url = pictures
    s3.client().put_object(Bucket=bucket, Key="scores/theirs.parquet", Body=b"someone else's")
    with pytest.raises(Exception, match="exists and is not the output of this job"):
        run_scoring_job(JobSpec(str(tiny_bundle), [url], f"s3://{bucket}/scores/theirs.parquet"), progress=False)


def test_a_wrong_bucket_or_endpoint_is_one_line(tiny_bundle, pictures, bucket, tmp_path, monkeypatch):
    folder, url = pictures
    with pytest.raises(ObjectStoreError, match="no bucket 'no-such-bucket' at http://127.0.0.1:.*--input"):
        run_scoring_job(JobSpec(str(tiny_bundle), ["s3://no-such-bucket/uploads"], tmp_path / "a.parquet"),
                        progress=False)
    with pytest.raises(ObjectStoreError, match="no bucket 'no-such-bucket' .*--output"):
        run_scoring_job(JobSpec(str(tiny_bundle), [folder], "s3://no-such-bucket/a.parquet"), progress=False)
    with pytest.raises(Exception, match=f"^s3://{bucket}/scores/: output must end in .parquet or .jsonl"):
        run_scoring_job(JobSpec(str(tiny_bundle), [folder], f"s3://{bucket}/scores/"), progress=False)
    with pytest.raises(Exception, match="no objects under this prefix"):
        run_scoring_job(JobSpec(str(tiny_bundle), [url + "-not-there"], tmp_path / "b.parquet"), progress=False)

    # From the command line: exit code 2, one line, no credential in it.
    monkeypatch.setenv(variable("s3_endpoint_url"), f"http://127.0.0.1:{free_port()}")
    done = run_cli("score", "--model", str(tiny_bundle), "--input", url, "--output", str(tmp_path / "c.parquet"),
                   "--quiet", timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the S3 endpoint http://127.0.0.1:" in lines[0], done.stderr
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in done.stderr
