"""Batch scoring on a two-node Ray cluster against the local engine, in the same run on the same cores.

    python benchmarks/ray_cluster.py --rounds 3

Starts a real cluster on this machine (scoring/local_ray.py: `ray start --head` and `ray start --address`,
one CPU each, so the two Ray actors have the two cores the local engine's two sessions get) and scores
the 70,000 MNIST images (the two gzipped IDX files) with `protoserve score`'s job, alternating the local
engine and `--engine ray --ray-address` round by round so that load from other processes falls on both.
Each Ray run pays what a Ray job pays: joining the cluster, starting its actors (each opens its session);
scoring starts on the first actor ready, so the images per node are printed with each round.
Prints each round, the medians, the ratio ray / local and the images each node scored.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protoserve.settings import settings  # noqa: E402
from scoring.job import JobSpec  # noqa: E402
from scoring.local_ray import ray_cluster  # noqa: E402
from scoring.run import run_scoring_job  # noqa: E402


def rate(spec: JobSpec, **engine) -> tuple[float, dict[str, int]]:
    """(images/s over the whole job, images per Ray node) of one job from scratch."""
    started = time.perf_counter()
    summary = run_scoring_job(spec, restart=True, progress=False, **engine)
    assert summary.failed == 0 and summary.scored_now == summary.images, summary
    return summary.images / (time.perf_counter() - started), summary.nodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=str(REPO / "models" / "prototypedl_mnist" / "bundle"))
    parser.add_argument("--data-root", default=str(settings().data_root or REPO.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=2000, help="inputs per chunk (both engines)")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args()
    images = [str(Path(args.data_root) / name) for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    local, ray, nodes = [], [], {}
    with ray_cluster(node_env={"PYTHONPATH": path}) as cluster, tempfile.TemporaryDirectory() as work:
        os.environ.update(cluster.env)
        roles = {node.node_id: role for role, node in cluster.nodes.items()}
        spec = JobSpec(args.bundle, images, Path(work) / "out.parquet", chunk_size=args.chunk_size,
                       workers=2)
        rate(spec)  # untimed: the process's first job pays one-time costs
        for r in range(args.rounds):
            local.append(rate(spec)[0])
            on_ray, per_node = rate(spec, engine="ray", ray_address=cluster.address)
            ray.append(on_ray)
            nodes = {roles.get(node, node): n for node, n in per_node.items()}
            print(f"round {r + 1}: local {local[-1]:.0f} images/s, two-node Ray {on_ray:.0f} images/s "
                  f"(ratio {on_ray / local[-1]:.2f}; images per node {nodes})", flush=True)
    med = statistics.median
    figures = {"images": 70_000, "rounds": args.rounds, "chunk_size": args.chunk_size,
               "local_images_per_s": local, "ray_images_per_s": ray, "local_median": med(local),
               "ray_median": med(ray), "ray_over_local": med(ray) / med(local), "last_ray_images_per_node": nodes}
    print(json.dumps(figures, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
