"""Training speed of PrototypeDL with and without elastic deformation, and accuracy against time.

    python benchmarks/train_prototypedl.py [--steps 40] [--threads 2] [--metrics runs/.../metrics.jsonl]

Prints images/s of full training steps (forward, four-term loss, backward, Adam) on real MNIST
batches of 250, with and without the elastic deformation, measured in the same process and
interleaved so that machine load hits both alike; the deformation alone; and, from a run's
metrics.jsonl, validation accuracy against wall-clock time (also written as a PNG).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from training.config import Config
from training.elastic import elastic_deform
from training.mnist import load_mnist
from training.prototypedl import PrototypeDL, prototypedl_loss
from training.splits import resolve_data_root

REPO = Path(__file__).resolve().parents[1]


def train_steps(model, optimizer, batches, elastic: bool, generator) -> float:
    """Seconds for one training step per batch."""
    cfg = Config()
    started = time.perf_counter()
    for x, y in batches:
        if elastic:
            x = elastic_deform(x, 4.0, 20.0, generator=generator)
        terms = prototypedl_loss(model(x), x, y, cfg.loss)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
    return time.perf_counter() - started


def accuracy_against_time(metrics: Path, png: Path) -> None:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    print(f"\nvalidation accuracy against wall-clock time ({metrics}):")
    print(f"{'epoch':>6} {'minutes':>8} {'val acc':>8}")
    marks = {1, 2, 5, 10, 20, 50, 100, rows[-1]["epoch"]} | {r["epoch"] for r in rows if r["epoch"] % 25 == 0}
    for r in rows:
        if r["epoch"] in marks:
            print(f"{r['epoch']:>6} {r['wall_seconds'] / 60:>8.1f} {r['val_accuracy']:>8.4f}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["wall_seconds"] / 60 for r in rows], [r["val_accuracy"] for r in rows])
    ax.set_xlabel("wall-clock minutes")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0.95, 1.0)
    ax.grid(alpha=0.3)
    fig.savefig(png, dpi=110, bbox_inches="tight")
    print(f"written {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-root")
    parser.add_argument("--metrics", default=str(REPO / "models/prototypedl_mnist/metrics.jsonl"))
    parser.add_argument("--png", default="benchmarks/accuracy_vs_time.png")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train = load_mnist(resolve_data_root(args.data_root))["train"]
    batches = [(train.images[i:i + 250], train.labels[i:i + 250]) for i in range(0, 250 * args.steps, 250)]
    model = PrototypeDL(Config().model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    train_steps(model, optimizer, batches[:5], True, generator)  # warm-up

    seconds = {False: 0.0, True: 0.0}
    for _ in range(args.rounds):
        for elastic in (False, True):
            seconds[elastic] += train_steps(model, optimizer, batches, elastic, generator)
    images = args.rounds * len(batches) * 250
    plain, deformed = images / seconds[False], images / seconds[True]

    started = time.perf_counter()
    for x, _ in batches:
        elastic_deform(x, 4.0, 20.0, generator=generator)
    deform_only = len(batches) * 250 / (time.perf_counter() - started)

    print(f"PrototypeDL training, batch 250, {args.threads} threads, {images} images per variant")
    print(f"{'variant':<34} {'images/s':>10}")
    print(f"{'train step, no deformation':<34} {plain:>10.0f}")
    print(f"{'train step, elastic deformation':<34} {deformed:>10.0f}")
    print(f"{'elastic deformation alone':<34} {deform_only:>10.0f}")
    print(f"ratio with/without deformation: {deformed / plain:.2f}  "
          f"(epoch of 55,000 images: {55000 / deformed:.1f} s with deformation)")

    if Path(args.metrics).is_file():
        accuracy_against_time(Path(args.metrics), Path(args.png))


if __name__ == "__main__":
    main()
