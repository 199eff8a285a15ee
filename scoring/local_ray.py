"""A real two-node Ray cluster on this machine for tests, benchmarks and `make cluster-demo`: `ray start --head` and
`ray start --address`, each a separate process group with its own temporary folder, free ports, one CPU
and a custom resource naming its role (`head_node`, `worker_node`); stopped by killing the two process
groups (never `ray stop`, which stops every Ray on the machine, other people's included)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from protoserve.local_processes import free_ports

RAY = Path(sys.executable).with_name("ray")
OBJECT_STORE_BYTES = 80 * 1024 * 1024  # per node: the job's blocks are a few MB


@dataclass
class RayNode:
    role: str  # "head_node" | "worker_node": the custom resource the node was started with
    process: subprocess.Popen  # `ray start --block`: the leader of the node's process group
    temp_dir: Path
    log: Path
    node_id: str = ""

    def kill(self) -> None:
        """SIGKILL every process of the node (raylet, object store, its workers and actors): a lost machine."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


@dataclass
class RayCluster:
    address: str  # the head's GCS, host:port: `--ray-address` / $RAY_ADDRESS
    env: dict[str, str]  # what a driver process needs besides the address (the cluster's auth mode)
    nodes: dict[str, RayNode] = field(default_factory=dict)  # role -> node

    def wait_for_nodes(self, count: int, timeout: float) -> list[dict]:
        """The live nodes (`ray.nodes()` rows: NodeID, Resources, ...) once there are `count` of them, read
        by a short driver process (the state API needs the dashboard, which the nodes run without)."""
        out = subprocess.run([sys.executable, "-c", _WAIT_FOR_NODES, self.address, str(count), str(timeout)],
                             capture_output=True, text=True, timeout=timeout + 60, env={**os.environ, **self.env})
        if out.returncode != 0:
            raise RuntimeError(f"the Ray cluster at {self.address} has not {count} live nodes: {out.stderr[-2000:]}")
        return json.loads(out.stdout.splitlines()[-1])


_WAIT_FOR_NODES = """
import json, sys, time
import ray
address, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ray.init(address=address, log_to_driver=False)
deadline = time.monotonic() + timeout
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) >= count or time.monotonic() > deadline:
        break
    time.sleep(0.5)
ray.shutdown()
if len(nodes) < count:
    sys.exit(f"{len(nodes)} live nodes after {timeout} s")
print(json.dumps(nodes))
"""


def _start(role: str, args: list[str], env: dict[str, str]) -> RayNode:
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Unix socket paths live under it
    listen, grpc, runtime_env, metrics = free_ports(4)
    log = temp_dir / "ray-start.log"
    cmd = [str(RAY), "start", "--block", *args, "--num-cpus=1", "--num-gpus=0",
           f"--resources={json.dumps({role: 1})}", f"--object-store-memory={OBJECT_STORE_BYTES}",
           f"--temp-dir={temp_dir}", "--disable-usage-stats", f"--dashboard-agent-listen-port={listen}",
           f"--dashboard-agent-grpc-port={grpc}", f"--runtime-env-agent-port={runtime_env}",
           f"--metrics-export-port={metrics}"]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, **env})
    return RayNode(role, process, temp_dir, log)


@contextmanager
def ray_cluster(node_env: dict[str, str] | None = None, timeout: float = 180) -> Iterator[RayCluster]:
    """A head node and a worker node (one CPU each), both alive; every process killed on exit.
    `node_env`: variables for the nodes' processes (and so their workers), e.g. PYTHONPATH."""
    # Without token authentication, said explicitly: with RAY_AUTH_MODE unset, a head node turns it on when
    # it finds a ~/.ray/auth_token (someone else's) and then refuses the nodes and drivers that lack it.
    # A cluster reachable from other hosts runs with RAY_AUTH_MODE=token (docs/batch_scoring.md).
    env = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    gcs, client, dashboard = free_ports(3)
    cluster = RayCluster(f"127.0.0.1:{gcs}", env)
    env = {**env, **(node_env or {})}
    try:
        cluster.nodes["head_node"] = _start("head_node", [
            "--head", f"--port={gcs}", f"--ray-client-server-port={client}", "--include-dashboard=false",
            f"--dashboard-port={dashboard}"], env)
        _wait_for(cluster, 1, timeout)
        cluster.nodes["worker_node"] = _start("worker_node", [f"--address={cluster.address}"], env)
        for node in _wait_for(cluster, 2, timeout):
            role = next(r for r in cluster.nodes if node["Resources"].get(r))
            cluster.nodes[role].node_id = node["NodeID"]
        yield cluster
    finally:
        for node in reversed(cluster.nodes.values()):
            node.kill()
            shutil.rmtree(node.temp_dir, ignore_errors=True)


def _wait_for(cluster: RayCluster, count: int, timeout: float) -> list[dict]:
    for node in cluster.nodes.values():
        if node.process.poll() is not None:
            raise RuntimeError(f"ray start ({node.role}) exited {node.process.returncode}: "
                               f"{node.log.read_text()[-2000:]}")
    return cluster.wait_for_nodes(count, timeout)
