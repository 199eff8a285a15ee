"""Inference speed: ONNX Runtime (CPU) against PyTorch eager, in one process, on the same inputs.

Both run the whole classifier graph (logits, probabilities, distances, latent, reconstruction) at
batch sizes 1, 16, 64, 256. First a sweep over ONNX Runtime session options (graph optimisation
level x intra-op threads) picks the options by measurement; then the table: images per second
(median over repeated timed runs, taken in turns so that the load of shared cores falls on every
configuration alike) and the ratio ORT / PyTorch.

    .venv/bin/python benchmarks/inference_speed.py --checkpoint models/prototypedl_mnist/checkpoint.pt \
        --bundle models/prototypedl_mnist/bundle [--out runs/inference_benchmark.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bundle.manifest import read_bundle
from bundle.runtime import CPU, open_session
from export.onnx_export import classifier_graph
from training.checkpoint import load_checkpoint

BATCH_SIZES = [1, 16, 64, 256]
OPTIMIZATIONS = ["disable", "basic", "extended", "all"]


def time_per_batch(run, seconds: float, min_runs: int = 3) -> float:
    """Median wall time of one call over at least `seconds` and `min_runs` calls."""
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(runners: dict, seconds: float, rounds: int) -> dict:
    """Median time per call of each runner, measured in turns: round after round, every runner
    gets a slice, so a change in the load of shared cores falls on all of them alike."""
    for run in runners.values():
        for _ in range(3):  # warm-up: first runs allocate and tune
            run()
    samples = {key: [] for key in runners}
    for _ in range(rounds):
        for key, run in runners.items():
            samples[key].append(time_per_batch(run, seconds / rounds))
    return {key: statistics.median(times) for key, times in samples.items()}


def ort_runner(session, images: np.ndarray):
    names = [o.name for o in session.get_outputs()]
    return lambda: session.run(names, {"image": images})


def torch_runner(graph, images: torch.Tensor):
    def run():
        with torch.inference_mode():
            graph(images)
    return run


def sweep(model_path: Path, inputs: dict[int, np.ndarray], threads: list[int], seconds: float,
          rounds: int) -> list[dict]:
    runners = {}
    for optimization in OPTIMIZATIONS:
        for n_threads in threads:
            session, provider = open_session(model_path, "cpu", threads=n_threads, optimization=optimization)
            assert provider == CPU
            for batch, images in inputs.items():
                runners[optimization, n_threads, batch] = ort_runner(session, images)
    times = interleaved(runners, seconds, rounds)
    return [{"optimization": o, "threads": n, "batch": b, "images_per_second": b / t}
            for (o, n, b), t in times.items()]


def choose(rows: list[dict]) -> tuple[str, int]:
    """The options with the best geometric mean of images/s over the batch sizes."""
    scores = {}
    for r in rows:
        scores.setdefault((r["optimization"], r["threads"]), []).append(np.log(r["images_per_second"]))
    return max(scores, key=lambda k: np.mean(scores[k]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="models/prototypedl_mnist/checkpoint.pt")
    parser.add_argument("--bundle", default="models/prototypedl_mnist/bundle")
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="turns the timed seconds are split into")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="intra-op thread counts to sweep (default: 1 .. number of CPUs)")
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    cpus = os.cpu_count() or 1
    threads = args.threads or list(range(1, cpus + 1))
    bundle = read_bundle(args.bundle)
    model, _, _ = load_checkpoint(Path(args.checkpoint))
    graph = classifier_graph(model).eval()
    rng = np.random.default_rng(0)
    spec = bundle.manifest.input
    inputs = {b: rng.random((b, spec.channels, spec.height, spec.width), dtype=np.float32) for b in BATCH_SIZES}

    print(f"# {platform.processor() or platform.machine()}, {cpus} CPUs, torch {torch.__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}")
    rows = sweep(bundle.model_path, inputs, threads, args.seconds, args.rounds)
    print("\nONNX Runtime session options (images/s):")
    print("| optimisation | threads | " + " | ".join(f"batch {b}" for b in BATCH_SIZES) + " |")
    print("|---|---|" + "---|" * len(BATCH_SIZES))
    for optimization in OPTIMIZATIONS:
        for n in threads:
            cells = [r["images_per_second"] for r in rows if (r["optimization"], r["threads"]) == (optimization, n)]
            print(f"| {optimization} | {n} | " + " | ".join(f"{c:,.0f}" for c in cells) + " |")
    best_opt, best_threads = choose(rows)
    print(f"\nchosen: optimisation {best_opt!r}, {best_threads} intra-op threads")

    torch.set_num_threads(best_threads)  # the same cores for both runtimes
    session, _ = open_session(bundle.model_path, "cpu", threads=best_threads, optimization=best_opt)
    runners = {}
    for b in BATCH_SIZES:
        runners["onnxruntime", b] = ort_runner(session, inputs[b])
        runners["pytorch", b] = torch_runner(graph, torch.from_numpy(inputs[b]))
    times = interleaved(runners, args.seconds, args.rounds)
    table = [{"batch": b, "onnxruntime_images_per_second": b / times["onnxruntime", b],
              "pytorch_images_per_second": b / times["pytorch", b],
              "ratio": times["pytorch", b] / times["onnxruntime", b]} for b in BATCH_SIZES]
    print(f"\nONNX Runtime CPU ({best_opt}, {best_threads} threads) against PyTorch eager ({best_threads} threads):")
    print("| batch | PyTorch eager (images/s) | ONNX Runtime CPU (images/s) | ratio ORT/PyTorch |")
    print("|---:|---:|---:|---:|")
    for r in table:
        print(f"| {r['batch']} | {r['pytorch_images_per_second']:,.0f} | {r['onnxruntime_images_per_second']:,.0f} "
              f"| {r['ratio']:.2f}x |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"sweep": rows, "chosen": {"optimization": best_opt,
                                                                          "threads": best_threads},
                                              "table": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
