"""Serving speed: protoserve (BentoML) against the framework floor, the raw ONNX Runtime session and a naive server.

    python benchmarks/serve.py --bundle models/prototypedl_mnist/bundle \
        --checkpoint models/prototypedl_mnist/checkpoint.pt --out runs/serve_benchmark.json

Four systems in one run, on the same test digit (a 28x28 PNG, base64 in JSON, one image per call):
  raw ORT       the bundle's model.onnx in this process, session.run on one image (the limit)
  protoserve    `bentoml serve service.api:Protoserve` (2 API workers, adaptive batching)
  floor         `bentoml serve benchmarks.floor_service:Floor`: bare BentoML with protoserve's settings
                answering a fixed JSON of /predict's shape (no middleware, decoding, model or metrics):
                what the framework itself costs per request; protoserve is reported as a ratio of it
  naive         FastAPI + PyTorch eager, one image per call, one uvicorn worker: what a user might
                write instead (the shape of the public ProtoPNet HTTP API)
For each server: latency p50/p95/p99 and throughput of /predict (and protoserve's /explain) with 1,
8 and 64 clients in a closed loop (each sends its next request when the last one is answered), in
alternating rounds (medians reported), the CPU time its processes spent per request, and the resident
memory of each API worker afterwards.
The load generator (aiohttp) runs on the same machine and shares its cores with the servers.
This file may import torch (the naive baseline); the service never does."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONCURRENCY = (1, 8, 64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def test_digit(bundle: Path) -> tuple[np.ndarray, str]:
    """The bundle's first probe image as the model input [1, C, H, W] and as a base64 PNG."""
    from bundle.manifest import read_bundle
    from bundle.runtime import load_probe
    from inference.explain import pixels_to_picture, png_bytes
    from inference.preprocess import denormalize

    loaded = read_bundle(bundle)
    x = load_probe(loaded)["input.image"][:1].astype(np.float32)
    picture = pixels_to_picture(denormalize(x[0], loaded.manifest.input))
    return x, base64.b64encode(png_bytes(picture)).decode()


def bench_raw(bundle: Path, x: np.ndarray, seconds: float) -> dict:
    """session.run on one image in a loop, with the service's session options: on the whole model.onnx, and
    on the graph cut to the outputs /predict reads (the session the service's classify runs)."""
    from bundle.manifest import read_bundle
    from bundle.runtime import open_session
    from bundle.subgraph import restrict_outputs
    from inference.model import classifier_outputs

    loaded = read_bundle(bundle)
    session, provider = open_session(loaded.model_path, "auto")
    outputs = classifier_outputs(loaded)
    cut = open_session(restrict_outputs(loaded.model_path.read_bytes(), outputs), "auto")[0]
    result = {"provider": provider}
    for key, s, names in (("batch_1", session, ["probabilities", "distances"]), ("batch_1_cut", cut, outputs)):
        for _ in range(50):
            s.run(names, {"image": x})
        times = []
        end = time.perf_counter() + seconds / 2
        while time.perf_counter() < end:
            t = time.perf_counter()
            s.run(names, {"image": x})
            times.append(time.perf_counter() - t)
        result[key] = {**percentiles(times), "images_per_s": len(times) / sum(times)}
    batch = np.repeat(x, 64, axis=0)
    t = time.perf_counter()
    runs = 0
    while time.perf_counter() - t < seconds / 2:
        session.run(["probabilities", "distances"], {"image": batch})
        runs += 1
    result["batch_64_images_per_s"] = runs * 64 / (time.perf_counter() - t)
    return result


async def closed_loop(url: str, body: dict | None, clients: int, requests: int) -> dict:
    """`clients` connections, each sending its next request when the last is answered (GET if no body).

    The client is aiohttp with the body serialised once: it spends several times less CPU per request
    than httpx, CPU it would otherwise take from the servers it shares the cores with."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    remaining = requests
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as client:

        async def call() -> int:
            request = client.get(url) if data is None else client.post(url, data=data, headers=headers)
            async with request as r:
                await r.read()
                return r.status

        for _ in range(min(20, requests)):  # warm-up, not counted (a 503 is possible at a tight latency cap)
            status = await call()
            if status not in (200, 503):
                raise SystemExit(f"{url}: HTTP {status} in the warm-up")

        async def worker():
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                t = time.perf_counter()
                status = await call()
                latencies.append(time.perf_counter() - t)
                errors += status != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - started
    return {"clients": clients, "requests": len(latencies), "errors": errors, **percentiles(latencies),
            "requests_per_s": len(latencies) / wall}


def requests_for(clients: int, scale: float) -> int:
    return int(max(200, 12 * clients) * scale)


class Server:
    """A server subprocess in its own process group, stopped on exit."""

    def __init__(self, command: list[str], env: dict, ready_url: str, log: Path):
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.wait_ready(ready_url)

    def wait_ready(self, url: str, timeout: float = 240) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited: see {self.log}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"server not ready after {timeout} s: see {self.log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_protoserve(bundle: Path, log: Path, **env_extra: str) -> tuple[Server, str]:
    port = free_port()
    env = {**os.environ, "PROTOSERVE_BUNDLE": str(bundle.resolve()), "PYTHONPATH": str(REPO),
           "BENTOML_DO_NOT_TRACK": "True", **env_extra}
    command = [sys.executable, "-m", "bentoml", "serve", "service.api:Protoserve", "--host", "127.0.0.1",
               "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    return Server(command, env, f"{url}/readyz", log), url


def start_naive(checkpoint: Path, log: Path) -> tuple[Server, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "NAIVE_CHECKPOINT": str(checkpoint.resolve())}
    command = [sys.executable, "-m", "uvicorn", "benchmarks.serve:naive_app", "--factory", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    return Server(command, env, f"{url}/health", log), url


class NaiveRequest(BaseModel):
    image: str


def naive_app():
    """The naive baseline: FastAPI + PyTorch eager, one base64 PNG per call, no batching."""
    import io

    import torch
    from fastapi import FastAPI
    from PIL import Image

    from training.checkpoint import load_checkpoint

    model, config, _ = load_checkpoint(Path(os.environ["NAIVE_CHECKPOINT"]))
    model.eval()
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"ok": True}

    @app.post("/predict")
    def predict(request: NaiveRequest):
        img = Image.open(io.BytesIO(base64.b64decode(request.image))).convert("L").resize((28, 28))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None, None]
        with torch.no_grad():
            out = model(x)
            probabilities = torch.softmax(out.logits, dim=1)[0]
        label = int(probabilities.argmax())
        return {"label": label, "probabilities": probabilities.tolist(),
                "distances": out.distances[0].tolist()}

    return app


def predict_c64(bundle: Path, log: Path, image: str, scale: float, **env: str) -> dict:
    """/predict at c=64 on a protoserve started with these environment settings (the sweeps)."""
    server, url = start_protoserve(bundle, log, **env)
    try:
        return asyncio.run(closed_loop(f"{url}/predict", {"images": [image]}, 64, requests_for(64, scale)))
    finally:
        server.stop()


def start_floor(log: Path) -> tuple[Server, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "BENTOML_DO_NOT_TRACK": "True"}
    command = [sys.executable, "-m", "bentoml", "serve", "benchmarks.floor_service:Floor", "--host", "127.0.0.1",
               "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    return Server(command, env, f"{url}/readyz", log), url


def worker_memory_mb(server: Server) -> list[float]:
    """Resident memory (RSS, MB) of each BentoML API worker under this server."""
    import psutil

    workers = [p for p in psutil.Process(server.process.pid).children(recursive=True)
               if "_bentoml_impl.worker.service" in " ".join(p.cmdline())]
    return sorted(p.memory_info().rss / 2**20 for p in workers)


def server_cpu_seconds(server: Server) -> float:
    """CPU time (user + system) used so far by a server's processes: the server and all its workers."""
    import psutil

    total = 0.0
    root = psutil.Process(server.process.pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:  # a process that ended meanwhile
            continue
        total += times.user + times.system
    return total


def median_row(rows: list[dict]) -> dict:
    """One row of medians over the rounds, with each round's p50, throughput and server CPU kept beside it."""
    keys = ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "requests_per_s", "server_cpu_us")
    row = {"clients": rows[0]["clients"], "requests": sum(r["requests"] for r in rows),
           "errors": sum(r["errors"] for r in rows),
           **{k: float(np.median([r[k] for r in rows])) for k in keys if k in rows[0]}}
    row["rounds"] = [{k: r[k] for k in ("p50_ms", "requests_per_s", "server_cpu_us") if k in r} for r in rows]
    return row


def alternating_rounds(systems: dict[str, tuple[str, dict, Server]], rounds: int,
                       scale: float) -> dict[str, list[dict]]:
    """Every system at every concurrency, `rounds` times, the systems taking turns at each level, so a
    change in the machine's load (the cores are shared) falls on all alike; medians over the rounds. Each
    row also has the CPU time the server's processes spent per request (server_cpu_us): unlike the
    throughput, it hardly moves with what else the machine is running."""
    raw: dict[str, dict[int, list[dict]]] = {key: {c: [] for c in CONCURRENCY} for key in systems}
    for r in range(rounds):
        for c in CONCURRENCY:
            for key, (url, body, server) in systems.items():
                cpu = server_cpu_seconds(server)
                row = asyncio.run(closed_loop(url, body, c, requests_for(c, scale)))
                row["server_cpu_us"] = (server_cpu_seconds(server) - cpu) / max(row["requests"], 1) * 1e6
                raw[key][c].append(row)
                print(f"  round {r + 1} {key:20s} c={c:<3d} p50 {row['p50_ms']:7.2f} ms  p95 {row['p95_ms']:7.2f}  "
                      f"p99 {row['p99_ms']:7.2f}  {row['requests_per_s']:7.1f} req/s  errors {row['errors']}  "
                      f"server CPU {row['server_cpu_us']:5.0f} us/request", flush=True)
    return {key: [median_row(raw[key][c]) for c in CONCURRENCY] for key in systems}


def per_round(a: dict, b: dict, figure) -> float:
    """Median over the rounds of figure(a's round, b's round) for two rows of the same level: a ratio or
    a difference taken within a round, where both systems saw the same machine load."""
    return float(np.median([figure(x, y) for x, y in zip(a["rounds"], b["rounds"], strict=True)]))


def floor_ratios(result: dict) -> dict:
    """protoserve /predict against the framework floor at each level."""
    ratios = {}
    for mine, floor in zip(result["protoserve_predict"], result["floor_predict"], strict=True):
        ratios[f"c{mine['clients']}"] = {
            "throughput": per_round(mine, floor, lambda m, f: m["requests_per_s"] / f["requests_per_s"]),
            "p50": per_round(mine, floor, lambda m, f: m["p50_ms"] / f["p50_ms"]),
            "p50_minus_floor_ms": per_round(mine, floor, lambda m, f: m["p50_ms"] - f["p50_ms"]),
            # /proc counts CPU time in ticks: a short run can show none (NaN then).
            "server_cpu": per_round(mine, floor, lambda m, f: m["server_cpu_us"] / f["server_cpu_us"]
                                    if f["server_cpu_us"] > 0 else float("nan"))}
    return ratios


def targets(result: dict) -> dict:
    """The figures the serving targets are stated in (README "Serving speed"), each taken within a round."""
    raw_p50 = result["raw"]["batch_1"]["p50_ms"]
    predict, explain, naive = result["protoserve_predict"], result["protoserve_explain"], result["naive_predict"]
    memory = result["worker_memory_mb"]
    return {
        "predict_c1_p50_minus_floor_minus_raw_ms": result["floor_ratios"]["c1"]["p50_minus_floor_ms"] - raw_p50,
        "predict_c1_p50_vs_floor_plus_raw": per_round(predict[0], result["floor_predict"][0],
                                                      lambda m, f: m["p50_ms"] / (f["p50_ms"] + raw_p50)),
        "predict_c64_throughput_vs_floor": result["floor_ratios"]["c64"]["throughput"],
        "predict_c64_throughput_vs_naive": per_round(predict[-1], naive[-1],
                                                     lambda m, n: m["requests_per_s"] / n["requests_per_s"]),
        "explain_c1_p50_minus_predict_ms": per_round(explain[0], predict[0], lambda e, p: e["p50_ms"] - p["p50_ms"]),
        "worker_memory_vs_floor": max(memory["protoserve"]) / max(memory["floor"]),
    }


def print_targets(t: dict) -> None:
    print(f"targets: /predict c=1 p50 is floor + raw + {t['predict_c1_p50_minus_floor_minus_raw_ms']:.2f} ms "
          f"(target <= 0.3 ms), x{t['predict_c1_p50_vs_floor_plus_raw']:.2f} (floor + raw) (target <= 1.25); "
          f"c=64 throughput {t['predict_c64_throughput_vs_floor']:.2f}x the floor (target >= "
          f"0.8) and {t['predict_c64_throughput_vs_naive']:.2f}x naive (target >= 5); /explain c=1 p50 is /predict "
          f"+ {t['explain_c1_p50_minus_predict_ms']:.2f} ms (target <= 1 ms); worker memory "
          f"{t['worker_memory_vs_floor']:.2f}x the floor's (target <= 1.5)")


def compare_servers(args, bundle: Path, checkpoint: Path, out: Path, image: str, result: dict) -> None:
    """The three servers side by side, alternating rounds, then the secondary figures and worker memory."""
    print(f"protoserve (bentoml serve, 2 API workers, adaptive batching), the framework floor (bare BentoML, 2 "
          f"workers, a fixed answer) and the naive FastAPI + PyTorch eager server (1 uvicorn worker); "
          f"{args.rounds} alternating rounds:", flush=True)
    server, url = start_protoserve(bundle, out.with_suffix(".protoserve.log"))
    floor, floor_url = start_floor(out.with_suffix(".floor.log"))
    naive, naive_url = start_naive(checkpoint, out.with_suffix(".naive.log"))
    try:
        result.update(alternating_rounds({
            "protoserve_predict": (f"{url}/predict", {"images": [image]}, server),
            "floor_predict": (f"{floor_url}/predict", {"images": [image]}, floor),
            "naive_predict": (f"{naive_url}/predict", {"image": image}, naive),
            "protoserve_explain": (f"{url}/explain", {"image": image, "top_k": 3}, server)}, args.rounds,
            args.scale))
        result["worker_memory_mb"] = {"protoserve": worker_memory_mb(server), "floor": worker_memory_mb(floor)}
        print(f"  resident memory per API worker after the runs: protoserve "
              f"{', '.join(f'{m:.0f}' for m in result['worker_memory_mb']['protoserve'])} MB, floor "
              f"{', '.join(f'{m:.0f}' for m in result['worker_memory_mb']['floor'])} MB", flush=True)
        secondary_figures(url, image, args.scale, result)
    finally:
        server.stop()
        floor.stop()
        naive.stop()


def secondary_figures(url: str, image: str, scale: float, result: dict) -> None:
    """Beside (never instead of) the one-image-per-call comparison: the HTTP floor of protoserve's stack
    (GET /livez) and /predict with the client it is designed for (up to 64 images per call)."""
    row = asyncio.run(closed_loop(f"{url}/livez", None, 1, requests_for(1, scale)))
    result["protoserve_livez_c1"] = row
    print(f"  protoserve GET /livez  c=1   p50 {row['p50_ms']:7.2f} ms", flush=True)
    row = asyncio.run(closed_loop(f"{url}/predict", {"images": [image] * 64}, 8, max(10, int(100 * scale))))
    row["images_per_s"] = row["requests_per_s"] * 64
    result["protoserve_predict_64_images_per_call"] = row
    print(f"  protoserve /predict, 64 images per call, c=8: p50 {row['p50_ms']:7.2f} ms  "
          f"{row['images_per_s']:7.0f} images/s (naive c=64: {result['naive_predict'][-1]['requests_per_s']:.0f} "
          "images/s)", flush=True)


# (result key, setting, environment variable, values, what the heading says it is)
SWEEPS = (("batch_size_sweep", "max_batch_size", "PROTOSERVE_MAX_BATCH_SIZE", (1, 16, 64), "max batch size"),
          ("max_latency_sweep", "max_latency_ms", "PROTOSERVE_MAX_LATENCY_MS", (20, 200, 2000),
           "max latency (the dispatcher answers 503 past it)"))


def batching_sweeps(bundle: Path, out: Path, image: str, scale: float, result: dict) -> None:
    for key, setting, variable, values, heading in SWEEPS:
        print(f"adaptive batching: /predict at c=64 by {heading}", flush=True)
        result[key] = []
        for value in values:
            row = predict_c64(bundle, out.with_suffix(f".{key}{value}.log"), image, scale, **{variable: str(value)})
            print(f"  {setting} {value:5d}: c=64 p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} "
                  f"{row['requests_per_s']:.1f} req/s, {row['errors']} of {row['requests']} refused", flush=True)
            result[key].append({setting: value, **row})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=str(REPO / "models/prototypedl_mnist/bundle"))
    parser.add_argument("--checkpoint", default=str(REPO / "models/prototypedl_mnist/checkpoint.pt"),
                        help="the checkpoint the bundle was exported from (for the naive PyTorch server)")
    parser.add_argument("--out", default=str(REPO / "runs/serve_benchmark.json"))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the number of requests per level")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; figures are their medians")
    parser.add_argument("--sweep", action="store_true",
                        help="also measure /predict at c=64 for adaptive max batch sizes 1, 16, 64 and max "
                             "latencies 20, 200, 2000 ms")
    args = parser.parse_args()
    bundle, checkpoint, out = Path(args.bundle), Path(args.checkpoint), Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    x, image = test_digit(bundle)
    load = os.getloadavg()
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_before": load},
              "bundle": str(bundle), "rounds": args.rounds}
    print(f"{os.cpu_count()} CPUs, load average before the run {load[0]:.2f}", flush=True)

    print("raw ONNX Runtime session, in process:", flush=True)
    result["raw"] = bench_raw(bundle, x, seconds=5 * args.scale)
    raw = result["raw"]["batch_1"]
    print(f"  batch 1: p50 {raw['p50_ms']:.3f} ms  p95 {raw['p95_ms']:.3f}  p99 {raw['p99_ms']:.3f}  "
          f"{raw['images_per_s']:.0f} img/s; batch 64: {result['raw']['batch_64_images_per_s']:.0f} img/s; "
          f"batch 1 on the graph cut to /predict's outputs: p50 {result['raw']['batch_1_cut']['p50_ms']:.3f} ms")
    compare_servers(args, bundle, checkpoint, out, image, result)
    result["machine"]["loadavg_during"] = os.getloadavg()
    if args.sweep:
        batching_sweeps(bundle, out, image, args.scale, result)

    result["floor_ratios"] = floor_ratios(result)
    print("protoserve /predict / floor, medians of the per-round ratios: " + "; ".join(
        f"{c}: p50 x{r['p50']:.2f} (+{r['p50_minus_floor_ms']:.2f} ms), throughput x{r['throughput']:.2f}, "
        f"server CPU per request x{r['server_cpu']:.2f}"
        for c, r in result["floor_ratios"].items()))
    result["targets"] = targets(result)
    result["machine"]["loadavg_after"] = os.getloadavg()
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_targets(result["targets"])
    print(f"load average during the run {result['machine']['loadavg_during'][0]:.2f}; written to {out}")


if __name__ == "__main__":
    main()
