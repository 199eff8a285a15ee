"""`make cluster-demo` (`python -m cli.cluster_demo`): the deployment of docs/deployment.md on one machine.

Starts a PostgreSQL server (registry/local_postgres.py), an S3 server (registry/local_s3.py, SeaweedFS) and a
two-node Ray cluster (scoring/local_ray.py); registers the shipped PrototypeDL as 1.0.0 and a copy of it named
1.0.1 into the PostgreSQL registry whose bundles live in the bucket; promotes 1.0.0; starts two service replicas
(`bentoml serve`, one API worker each, each with its own cache) and two revision workers (`protoserve worker`);
prints what each replica serves; promotes 1.0.1 with `protoserve registry promote` and prints how long each
replica took to serve it; scores MNIST test images with `protoserve score --engine ray` on the cluster. Every
server it started is stopped at the end, on an error, on Ctrl+C or on a TERM (each is a process group of its own).
Throwaway servers with fixed, public credentials: a demo, not a deployment.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np

from bundle.manifest import copy_as_version
from protoserve.settings import environ, settings
from registry.local_postgres import LocalPostgres
from registry.local_s3 import seaweedfs
from scoring.local_ray import ray_cluster
from service.demo import REPO, running_service, stop

MODEL = REPO / "models" / "prototypedl_mnist"
BUCKET = "protoserve"
FIRST, SECOND = "1.0.0", "1.0.1"


def say(text: str) -> None:
    print(f"[cluster-demo] {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cli.cluster_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000, help="MNIST test images the batch job scores")
    p.add_argument("--work", type=Path, help="folder for logs, caches and the job's output (default: a new "
                   "temporary folder, removed at the end)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a TERM stops everything, as Ctrl+C does
    work = args.work or Path(tempfile.mkdtemp(prefix="protoserve-cluster-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        run(work, args.images)
    except KeyboardInterrupt:
        say("interrupted: everything started is stopped")
        return 130
    except Exception as e:
        say(f"failed: {type(e).__name__}: {e} (logs in {work})")
        return 1
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    say(f"done in {time.monotonic() - started:.0f} s; everything started is stopped")
    return 0


def run(work: Path, images: int) -> None:
    with ExitStack() as stack:
        say("starting PostgreSQL")
        postgres = stack.enter_context(LocalPostgres(durable=False))
        db = postgres.create_database("protoserve")
        say(f"PostgreSQL on 127.0.0.1:{postgres.port}; starting the S3 server (SeaweedFS)")
        s3 = stack.enter_context(seaweedfs(work / "seaweedfs"))
        s3.client().create_bucket(Bucket=BUCKET)
        say(f"S3 at {s3.endpoint}, bucket {BUCKET}; starting a two-node Ray cluster")
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        cluster = stack.enter_context(ray_cluster(node_env={"PYTHONPATH": path}))
        say(f"Ray head at {cluster.address}, nodes: {', '.join(cluster.nodes)}")

        shared = {**s3.env(), **environ(registry=work / "registry", registry_db=db,
                                        versions_url=f"s3://{BUCKET}/versions", cache_dir=work / "cache-cli")}
        second = copy_as_version(MODEL / "bundle", SECOND, work / f"bundle-{SECOND}")
        protoserve(shared, "registry", "register", str(MODEL / "bundle"), "--checkpoint", str(MODEL / "checkpoint.pt"))
        protoserve(shared, "registry", "register", str(second), "--checkpoint", str(MODEL / "checkpoint.pt"),
                   "--parent", FIRST)
        protoserve(shared, "registry", "promote", FIRST)
        say(f"registered {FIRST} and {SECOND} (bundles in s3://{BUCKET}/versions, rows in PostgreSQL); {FIRST} active")

        replicas = {}
        for name in ("a", "b"):
            env = {**shared, **environ(workers=1, cache_dir=work / f"cache-{name}"),
                   "BENTOML_HOME": str(work / f"bentoml-{name}")}
            say(f"starting replica {name}")
            replicas[name] = stack.enter_context(running_service(MODEL / "bundle", None, work / f"replica-{name}.log",
                                                                 240, env=env))
        for name in ("1", "2"):
            stack.callback(stop, start_worker(shared, work, name))
        say("two revision workers started (protoserve worker)")
        for name, url in replicas.items():
            say(f"replica {name} at {url} serves {served(url)}")

        protoserve(shared, "registry", "promote", SECOND)
        committed = time.monotonic()  # the command has returned: the promote is committed
        say(f"promoted {SECOND}")
        for name, url in replicas.items():
            seconds = wait_serving(url, SECOND, committed)
            say(f"replica {name} at {url} serves {SECOND} ({seconds:.2f} s after the promote returned)")

        inputs = write_test_images(work / "mnist-test.npy", images)
        out = protoserve({**shared, **cluster.env}, "score", "--model", str(MODEL / "bundle"), "--input", str(inputs),
                         "--output", str(work / "scores.parquet"), "--engine", "ray", "--ray-address", cluster.address,
                         "--workers", "2", "--chunk-size", str(max(images // 50, 1)), "--quiet")
        # 50 chunks: the first actor ready does not finish the job before the other node's actor has started
        say(f"batch job on the Ray cluster: {out.strip().splitlines()[-1]}")
        say("stopping the workers, the replicas, Ray, S3 and PostgreSQL")


def protoserve(env: dict[str, str], *args: str) -> str:
    """Run a protoserve command as an operator would; its output, or RuntimeError with its last lines."""
    done = subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **env, "PYTHONPATH": str(REPO)}, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"protoserve {' '.join(args[:2])} exited {done.returncode}: "
                           f"{' '.join((done.stderr or done.stdout).split())[-800:]}")
    return done.stdout


def start_worker(env: dict[str, str], work: Path, name: str) -> subprocess.Popen:
    data = {} if settings().data_root is None else environ(data_root=settings().data_root)
    with open(work / f"worker-{name}.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "cli.main", "worker", "--poll", "5"], cwd=REPO,
                                env={**os.environ, **env, **data, "PYTHONPATH": str(REPO)}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def served(url: str) -> str:
    model = httpx.get(f"{url}/metadata", timeout=10).raise_for_status().json()["model"]
    return f"{model['name']} {model['version']}"


def wait_serving(url: str, version: str, since: float, timeout: float = 60) -> float:
    """Seconds from `since` until the replica's /metadata names `version`."""
    while True:
        if served(url).endswith(f" {version}"):
            return time.monotonic() - since
        if time.monotonic() - since > timeout:
            raise RuntimeError(f"{url} still serves {served(url)} {timeout} s after the promote")
        time.sleep(0.05)


def write_test_images(out: Path, count: int) -> Path:
    """The first `count` MNIST test images (PROTOSERVE_DATA_ROOT's IDX file) as one .npy array; without the data,
    the shipped bundle's probe digits."""
    root = settings().data_root
    idx = [f / name for f in (root, root / "MNIST" / "raw") for name in ("t10k-images-idx3-ubyte",
           "t10k-images-idx3-ubyte.gz") if (f / name).is_file()] if root else []
    if idx:
        opener = gzip.open if idx[0].suffix == ".gz" else open
        with opener(idx[0], "rb") as f:
            f.read(16)
            images = np.frombuffer(f.read(count * 28 * 28), np.uint8).reshape(-1, 28, 28)
    else:
        say("no MNIST under PROTOSERVE_DATA_ROOT: scoring the bundle's probe digits")
        with np.load(MODEL / "bundle" / "probe.npz") as probe:
            images = probe["input.image"]
    np.save(out, images)
    return out


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
