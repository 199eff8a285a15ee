"""Where a served request's time goes, by part: over HTTP with py-spy, or in process with cProfile.

    .venv/bin/pip install py-spy      # a tool for this script, not a dependency of protoserve
    python benchmarks/profile_serve.py --clients 64 --requests 6000 [--system floor] [--route /explain]
    python benchmarks/profile_serve.py --asgi [--concurrency 64] [--system floor] [--route /explain]

HTTP (default): starts the service (or the framework floor, benchmarks/floor_service.py) as
benchmarks/serve.py does, samples each API worker with `py-spy record --format raw` (non-blocking,
idle threads left out) while an aiohttp closed loop sends one 28x28 PNG per call, sorts each sample
by the innermost frame that belongs to a known part and prints the sampled worker time per request
(ms) by part, both workers summed. On a shared machine the samples include time spent waiting for a
core, so compare parts within one run.
--asgi: builds the same service's ASGI app in this process (the app a worker serves: every middleware,
BentoML's included) and calls it directly, one request at a time (--concurrency N: N in flight, so
/predict's adaptive batching merges them): the CPU time per request (best of five runs, no profiler,
no HTTP parsing or client; the batcher's thread included), then a cProfile (thread CPU time) of the
same calls with each function's own time given to its part. A profiler slows Python code more than C,
so the parts' shares are the figure to read there.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
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
    ("protoserve API code", ("service/api.py", "numpy/")),
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
    return "Python standard library and the rest (inspect, contextlib, typing, ...)"


def read_raw(path: Path) -> collections.Counter:
    """py-spy's raw (collapsed) format: `frame;frame;... count` per line -> samples by part."""
    parts: collections.Counter = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            parts[part_of(stack)] += int(count)
    return parts


def part_of_file(filename: str) -> str:
    for part, fragments in PARTS:
        if any(f in filename for f in fragments):
            return part
    return "Python standard library and the rest (inspect, contextlib, typing, ...)"


def asgi_app(system: str):
    """The ASGI app a worker of this system serves (BentoML's middleware stack and the service's)."""
    import tempfile

    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="profile_serve_"))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    if system == "floor":
        from benchmarks.floor_service import Floor as service
    else:
        from service.api import Protoserve as service
    return service.to_asgi(is_main=True)


async def asgi_calls(app, route: str, body: bytes, n: int, concurrency: int = 1) -> None:
    """n POSTs of `body` to `route`, `concurrency` at a time (each caller sends its next when answered), each
    checked for a 200."""
    remaining = n

    async def caller():
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await asgi_call(app, route, body)

    await asyncio.gather(*(caller() for _ in range(concurrency)))


async def asgi_call(app, route: str, body: bytes) -> None:
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": route, "raw_path": route.encode(), "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 3000), "state": {}}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.sleep(3600)  # the client stays connected

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    if sent[0]["status"] != 200:
        raise SystemExit(f"{route}: HTTP {sent[0]['status']}: {sent[1:]}")


def profile_asgi(args, image: str) -> None:
    import cProfile
    import pstats

    app = asgi_app(args.system)
    body = json.dumps({"images": [image]} if args.route == "/predict" else {"image": image, "top_k": 3}).encode()

    async def run() -> tuple[float, pstats.Stats]:
        startup, done = asyncio.Queue(), asyncio.Event()
        await startup.put({"type": "lifespan.startup"})

        async def lifespan_send(message):
            done.set()

        lifespan = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                           startup.get, lifespan_send))
        await done.wait()  # the service instance is built (model loaded, warmed up)
        await asgi_calls(app, args.route, body, 300)
        best = float("inf")
        for _ in range(5):
            started = time.process_time()
            await asgi_calls(app, args.route, body, args.requests, args.concurrency)
            best = min(best, (time.process_time() - started) / args.requests)
        profile = cProfile.Profile(time.thread_time)
        profile.enable()
        await asgi_calls(app, args.route, body, args.requests, args.concurrency)
        profile.disable()
        lifespan.cancel()
        return best, pstats.Stats(profile)

    best, stats = asyncio.run(run())
    parts: collections.Counter = collections.Counter()
    for (filename, _, _), (_, _, own, _, callers) in stats.stats.items():
        if filename == "~" and callers:  # a builtin (a C function): its time goes to its callers' parts
            for (caller_file, _, _), (_, _, caller_own, _) in callers.items():
                parts[part_of_file(caller_file)] += own * caller_own / max(sum(c[2] for c in callers.values()),
                                                                           1e-12)
        else:
            parts[part_of_file(filename)] += own
    if os.environ.get("PROFILE_DUMP"):
        stats.dump_stats(os.environ["PROFILE_DUMP"])
    total = sum(parts.values())
    # One-image calls run their merged session runs on the event loop; only many-image calls use a thread.
    unseen = " (the event loop's thread only)" if args.concurrency > 1 else ""
    print(f"{args.system} {args.route}, in process, {args.concurrency} at a time: {best * 1e6:.0f} us of CPU per "
          f"request (best of 5 runs of {args.requests}); under cProfile, own time by part{unseen}:")
    for part, own in parts.most_common():
        print(f"  {own / total * 100:5.1f}%  {best * own / total * 1e6:6.0f} us  {part}")


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
    parser.add_argument("--asgi", action="store_true", help="in process, no HTTP: CPU per request and cProfile")
    parser.add_argument("--concurrency", type=int, default=1, help="--asgi: requests in flight at a time")
    args = parser.parse_args()
    if args.asgi:
        os.environ.setdefault("PROTOSERVE_BUNDLE", str(Path(args.bundle).resolve()))
        return profile_asgi(args, test_digit(Path(args.bundle))[1])
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
        name = f"{args.system}{args.route.replace('/', '_')}_c{args.clients}"
        raws = [out / f"{name}_{pid}.txt" for pid in worker_pids(server)]
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
