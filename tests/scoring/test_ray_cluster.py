"""`protoserve score --engine ray --ray-address` on a real two-node Ray cluster (`ray start --head` and
`ray start --address`, separate process groups, one CPU each: tests/ray_cluster.py): both nodes score,
and a job whose worker node is SIGKILLed mid-job, run again, writes every input exactly once."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from ray_cluster import ray_cluster
from scoring_helpers import REPO, png_bytes, read_rows

from protoserve.settings import variable
from scoring.job import JobSpec
from scoring.run import run_scoring_job

pytest.importorskip("ray", reason="protoserve[batch] (ray[data]) is not installed")

pytestmark = pytest.mark.slow

MNIST_TEST_IMAGES = 10_000


@pytest.fixture(scope="module")
def two_nodes(s3, tmp_path_factory):
    """The cluster, with the checkout on its workers' path (as a deployment installs protoserve on every node),
    and the S3 server's endpoint and key in its nodes' environment (as a deployment gives every node its own)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    cache = str(tmp_path_factory.mktemp("ray_nodes_cache"))
    with ray_cluster(node_env={"PYTHONPATH": path, **s3.env(), variable("cache_dir"): cache}) as cluster:
        yield cluster


@pytest.fixture
def mnist_test_images(mnist_root):
    plain = mnist_root / "t10k-images-idx3-ubyte"
    return str(plain if plain.exists() else plain.with_name(plain.name + ".gz"))


def test_a_job_runs_on_both_nodes(two_nodes, tiny_bundle, mnist_test_images, tmp_path):
    """Each chunk's rows come back with the id of the node whose actor scored them (the actor's
    ray.get_runtime_context().get_node_id()); the run returns the images per node id, and both node ids
    of the cluster are among them. Scoring starts on the first actor ready: 50 chunks leave the other
    actor time to start and take its share. The driver is a process of its own, as in a deployment (and
    this test process may hold a local Ray's state from tests/scoring/test_ray.py)."""
    output = tmp_path / "out.parquet"
    driver = subprocess.run([sys.executable, "-c", _DRIVER, str(tiny_bundle), mnist_test_images, str(output),
                             two_nodes.address], cwd=REPO, env={**os.environ, **two_nodes.env, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=300)
    assert driver.returncode == 0, driver.stderr[-3000:]
    images, failed, nodes = json.loads(driver.stdout.splitlines()[-1])
    assert images == MNIST_TEST_IMAGES and failed == 0
    assert set(nodes) == {two_nodes.nodes["head_node"].node_id, two_nodes.nodes["worker_node"].node_id}
    assert sum(nodes.values()) == MNIST_TEST_IMAGES
    assert [r["index"] for r in read_rows(output)] == list(range(MNIST_TEST_IMAGES))


_DRIVER = """
import json, sys
from pathlib import Path
from scoring.job import JobSpec
from scoring.run import run_scoring_job
bundle, images, output, address = sys.argv[1:]
summary = run_scoring_job(JobSpec(bundle, [images], Path(output), chunk_size=200), engine="ray",
                          ray_address=address, progress=False)
print(json.dumps([summary.images, summary.failed, summary.nodes]))
"""


def test_s3_inputs_and_output_on_the_cluster(two_nodes, tiny_bundle, digits, bucket, s3, tmp_path, monkeypatch):
    """The actors read the image objects themselves (the nodes' own S3 settings); the driver keeps the job's
    state in the bucket and uploads the output: the rows are the local engine's on the same files on disk."""
    monkeypatch.setenv(variable("cache_dir"), str(tmp_path / "cache"))
    folder, client = tmp_path / "uploads", s3.client()
    folder.mkdir()
    for i in range(200):
        (folder / f"{i:03d}.png").write_bytes(png_bytes(digits[i]))
        client.put_object(Bucket=bucket, Key=f"uploads/{i:03d}.png", Body=(folder / f"{i:03d}.png").read_bytes())
    output = f"s3://{bucket}/scores/ray.parquet"
    done = subprocess.run([sys.executable, "-m", "cli.main", "score", "--model", str(tiny_bundle), "--input",
                           f"s3://{bucket}/uploads", "--output", output, "--engine", "ray", "--ray-address",
                           two_nodes.address, "--chunk-size", "20", "--quiet"], cwd=REPO,
                          env={**os.environ, **two_nodes.env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"200 images in {output} (0 failed)")
    body = client.get_object(Bucket=bucket, Key="scores/ray.parquet")["Body"].read()
    rows = pq.read_table(io.BytesIO(body)).to_pylist()
    reference = tmp_path / "local.parquet"
    run_scoring_job(JobSpec(str(tiny_bundle), [str(folder)], reference), progress=False)
    want = read_rows(reference)
    assert [(r["input_id"].rpartition("/")[2], r["label"], r["prototype_ids"]) for r in rows] == \
        [(r["input_id"].rpartition("/")[2], r["label"], r["prototype_ids"]) for r in want]


def test_worker_node_killed_mid_job_then_rerun_writes_every_input_once(two_nodes, tiny_bundle, mnist_test_images,
                                                                      tmp_path):
    """SIGKILL the worker node's process group (raylet, object store, its actor) once the first chunks are
    committed: the job goes on on the head node (Ray Data retries the lost chunks there). Then SIGKILL the
    driver too (the machine it ran on is lost as well) and run the same command again: it scores only the
    chunks without a file, and every input is in the output once, with the local engine's rows.
    Runs last in this module: the cluster has one node left afterwards."""
    output = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "cli.main", "score", "--model", str(tiny_bundle), "--input", mnist_test_images,
               "--output", str(output), "--engine", "ray", "--ray-address", two_nodes.address,
               "--chunk-size", "100", "--quiet"]
    chunks = MNIST_TEST_IMAGES // 100
    env = {**os.environ, **two_nodes.env}
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    committed = _committed_chunks(output)
    assert _wait_until(lambda: len(committed()) > 0 or first.poll() is not None, 180)
    at_node_kill = len(committed())
    two_nodes.nodes["worker_node"].kill()
    went_on = _wait_until(lambda: len(committed()) >= at_node_kill + 5 or first.poll() is not None, 180)
    first.kill()
    _, first_err = first.communicate()
    at_driver_kill = len(committed())
    assert went_on and first.returncode == -9, f"not killed mid-job: {first_err.decode()[-2000:]}"
    assert 0 < at_node_kill and at_node_kill + 5 <= at_driver_kill < chunks and not output.exists()

    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"scored {MNIST_TEST_IMAGES - 100 * at_driver_kill} in" in again.stdout  # only the missing chunks
    rows = read_rows(output)
    assert [r["index"] for r in rows] == list(range(MNIST_TEST_IMAGES))
    assert len({r["input_id"] for r in rows}) == MNIST_TEST_IMAGES

    reference = tmp_path / "local.jsonl"
    run_scoring_job(JobSpec(str(tiny_bundle), [mnist_test_images], reference), progress=False)
    want = read_rows(reference)
    assert [(r["input_id"], r["label"], r["prototype_ids"]) for r in rows] == \
        [(r["input_id"], r["label"], r["prototype_ids"]) for r in want]


def _committed_chunks(output):
    folder = output.with_name(output.name + ".job")
    return lambda: sorted(folder.glob("chunk-*.arrow"))


def _wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False
