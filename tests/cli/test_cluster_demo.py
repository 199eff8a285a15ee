"""`make cluster-demo` end to end (cli/cluster_demo.py): PostgreSQL, S3, two replicas, two workers and a
two-node Ray cluster really start; both replicas serve 1.0.0, then 1.0.1 after the promote; the batch job
scores on both Ray nodes; and afterwards nothing it started still listens. About 45 s on 2 cores."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray", reason="protoserve[batch] (ray[data]) is not installed")
pytest.importorskip("boto3", reason="protoserve[s3] (boto3) is not installed")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SERVES = re.compile(r"replica (a|b) at (http://127\.0\.0\.1:\d+) serves (?:prototypedl-mnist )?(1\.0\.[01])")


def test_the_cluster_demo_promotes_on_both_replicas_scores_on_two_nodes_and_stops_everything(mnist_root,
                                                                                           tmp_path):
    done = subprocess.run([sys.executable, "-m", "cli.cluster_demo", "--work", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PROTOSERVE_DATA_ROOT": str(mnist_root)})
    out = done.stdout
    assert done.returncode == 0, out + done.stderr[-3000:]
    serves = SERVES.findall(out)
    assert [(name, version) for name, _, version in serves] == [("a", "1.0.0"), ("b", "1.0.0"),
                                                               ("a", "1.0.1"), ("b", "1.0.1")], out
    assert serves[0][1] != serves[1][1]  # two replicas on two ports
    assert re.search(r"batch job on the Ray cluster: 2000 images in .* \(0 failed\); .* on 2 Ray nodes", out), out
    assert "everything started is stopped" in out
    endpoint = re.search(r"S3 at (http://\S+),", out).group(1)
    for url in {u for _, u, _ in serves} | {endpoint}:
        with pytest.raises(httpx.TransportError):
            httpx.get(url, timeout=2)
