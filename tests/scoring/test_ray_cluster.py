"""`protoserve score --engine ray --ray-address` on a real two-node Ray cluster (`ray start --head` and
`ray start --address`, separate process groups, one CPU each: tests/ray_cluster.py): both nodes score,
and a job whose worker node is SIGKILLed mid-job, run again, writes every input exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from ray_cluster import ray_cluster
from scoring_helpers import REPO, read_rows

from scoring.job import JobSpec
from scoring.run import run_scoring_job

pytest.importorskip("ray", reason="protoserve[batch] (ray[data]) is not installed")

pytestmark = pytest.mark.slow

MNIST_TEST_IMAGES = 10_000


@pytest.fixture(scope="module")
def two_nodes():
    """The cluster, with the checkout on its workers' path (as a deployment installs protoserve on every node)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    with ray_cluster(node_env={"PYTHONPATH": path}) as cluster:
        yield cluster


@pytest.fixture
def mnist_test_images(mnist_root):
    plain = mnist_root / "t10k-images-idx3-ubyte"
    return str(plain if plain.exists() else plain.with_name(plain.name + ".gz"))


def test_a_job_runs_on_both_nodes(two_nodes, tiny_bundle, mnist_test_images, tmp_path, monkeypatch):
    """Each chunk's rows come back with the id of the node whose actor scored them (the actor's
    ray.get_runtime_context().get_node_id()); both node ids of the cluster are among them. Scoring starts
    on the first actor ready: 50 chunks leave the other actor time to start and take its share."""
    for name, value in two_nodes.env.items():
        monkeypatch.setenv(name, value)
    spec = JobSpec(str(tiny_bundle), [mnist_test_images], tmp_path / "out.parquet", chunk_size=200)
    summary = run_scoring_job(spec, engine="ray", ray_address=two_nodes.address, progress=False)
    assert summary.images == MNIST_TEST_IMAGES and summary.failed == 0
    assert set(summary.nodes) == {two_nodes.nodes["head_node"].node_id, two_nodes.nodes["worker_node"].node_id}
    assert sum(summary.nodes.values()) == MNIST_TEST_IMAGES
    assert [r["index"] for r in read_rows(spec.output)] == list(range(MNIST_TEST_IMAGES))


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
