"""Where a served request's time goes: py-spy on every API worker while /predict (or /explain) is under load.

    .venv/bin/pip install py-spy      # a tool for this script, not a dependency of protoserve
    python benchmarks/profile_serve.py --clients 64 --requests 6000 [--system floor] [--route /explain]

Starts the service (or the framework floor, benchmarks/floor_service.py) as benchmarks/serve.py does,
samples each worker with `py-spy record --format raw` (non-blocking, idle threads left out) while an
aiohttp closed loop sends one 28x28 PNG per call, then sorts each sample by the innermost frame that
belongs to a known part and prints the worker CPU per request (ms) by part, both workers summed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.serve import closed_loop, start_floor, start_protoserve, test_digit  # noqa: E402

# (part, path fragments): a sample counts for the first part, innermost frame first, whose fragment
# is in the frame's file. Order matters where one part calls another (our code calls numpy, PIL, json).
PARTS = (
    ("model (onnxruntime)", ("onnxruntime/",)),
    ("metrics (prometheus_client)", ("prometheus_client/", "service/metrics.py")),
    ("decode + preprocess (base64, PIL, numpy)", ("inference/preprocess.py", "PIL/", "base64.py")),
    ("answer (predictions, JSON)", ("inference/explain.py", "starlette/responses.py", "json/")),
    ("protoserve gate (middleware)", ("service/middleware.py",)),
    ("batching (dispatcher, threads)", ("service/batching.py", "marshal/dispatcher.py", "anyio/", "threading.py",
                                        "concurrent/futures")),
    ("protoserve API code", ("service/service.py", "numpy/")),
    ("BentoML request handling (validation, context, middleware)", ("_bentoml_sdk/", "_bentoml_impl/", "bentoml/",
                                                                    "pydantic", "starlette/", "opentelemetry/")),
    ("HTTP + event loop (uvicorn, httptools, asyncio)", ("uvicorn/", "httptools", "asyncio/", "uvloop")),
)


def part_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for part, fragments in PARTS:
            if any(f in frame for f in fragments):
                return part
    return "other"


def read_raw(path: Path) -> collections.Counter:
    """py-spy's raw (collapsed) format: `frame;frame;... count` per line -> samples by part."""
    parts: collections.Counter = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            parts[part_of(stack)] += int(count)
    return parts


def worker_pids(server) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(server.process.pid).children(recursive=True)
            if "_bentoml_impl.worker.service" in " ".join(p.cmdline())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=str(REPO / "models/prototypedl_mnist/bundle"))
    parser.add_argument("--system", choices=("protoserve", "floor"), default="protoserve")
    parser.add_argument("--route", default="/predict", choices=("/predict", "/explain"))
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second per worker")
    parser.add_argument("--out", default=str(REPO / "runs/profile_serve"))
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, image = test_digit(Path(args.bundle))
    if args.system == "floor":
        server, url = start_floor(out / "floor.log")
    else:
        server, url = start_protoserve(Path(args.bundle), out / "protoserve.log")
    body = {"images": [image]} if args.route == "/predict" else {"image": image, "top_k": 3}
    try:
        asyncio.run(closed_loop(f"{url}{args.route}", body, args.clients, 500))  # warm up
        raws = [out / f"{args.system}{args.route.replace('/', '_')}_c{args.clients}_{pid}.txt" for pid in worker_pids(server)]
        spies = [subprocess.Popen([py_spy, "record", "-p", str(pid), "-f", "raw", "-r", str(args.rate), "--nonblocking",
                                   "--full-filenames", "--nolineno", "-o", str(raw)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
                 for pid, raw in zip(worker_pids(server), raws, strict=True)]
        time.sleep(1.0)
        row = asyncio.run(closed_loop(f"{url}{args.route}", body, args.clients, args.requests))
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            spy.wait(60)
    finally:
        server.stop()
    parts: collections.Counter = collections.Counter()
    for raw in raws:
        parts += read_raw(raw)
    print(f"{args.system} {args.route} c={args.clients}: {row['requests']} requests, {row['requests_per_s']:.0f} "
          f"req/s, p50 {row['p50_ms']:.2f} ms; worker CPU per request (ms), both workers, by part:")
    per_request = {part: n / args.rate / row["requests"] * 1000 for part, n in parts.items()}
    for part, ms in sorted(per_request.items(), key=lambda kv: -kv[1]):
        print(f"  {ms:6.3f}  {part}")
    print(f"  {sum(per_request.values()):6.3f}  in all (samples may include up to 1 s before the load starts)")


if __name__ == "__main__":
    main()
