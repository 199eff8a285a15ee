"""The PrototypeDL paper's ablation (Li et al. 2018, "Case study 1"), on one schedule and budget.

    python benchmarks/ablation.py [--base CONFIG] [--seeds 0 1] [--jobs 2] [--epochs N] [--out runs/ablation]

Three variants of the same model, trained by the same trainer (`protoserve train`) on the same
schedule (--base, default configs/prototypedl_mnist_headline.yaml), each under every seed:
    prototypedl               the paper's network (autoencoder + prototype layer, four-term loss)
    fc_instead_of_prototypes  the prototype layer replaced by a fully connected layer of the same
                              width (15); decoder and its loss term R kept (R1, R2 need prototypes)
    plain_cnn                 the encoder and a fully connected classifier, no decoder, ReLU throughout
Runs go to <out>/<variant>_seed<k>/ and resume where they stopped; a finished run is not retrained.
The model of each run is chosen on the validation split (best.pt); the test set is read once per
run, after training. Prints the table (mean and spread over seeds beside the paper's figures) and
the wall time, writes <out>/ablation.json and the validation accuracy against wall-clock time of
every run as a PNG (--png).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs/prototypedl_mnist_headline.yaml"
VARIANTS = {
    "prototypedl": {},
    "fc_instead_of_prototypes": {"classifier": "fully_connected"},
    "plain_cnn": {"classifier": "fully_connected", "decoder": False, "hidden_activation": "relu",
                  "latent_activation": "relu"},
}
PAPER = {"prototypedl": 0.9922, "fc_instead_of_prototypes": 0.9924, "plain_cnn": 0.9923}  # test accuracy


def run_config(base: Path, variant: str, seed: int, epochs: int | None, train_subset: int | None) -> dict:
    """The base schedule with the variant's model and the seed (epochs and subset: a quick look only)."""
    config = yaml.safe_load(base.read_text())
    config["model"].update(VARIANTS[variant])
    config["train"]["seed"] = seed
    if epochs is not None:
        config["train"]["epochs"] = epochs
    if train_subset is not None:
        config["data"]["train_subset"] = train_subset
    return config


def finished(run: Path, epochs: int) -> bool:
    metrics = run / "metrics.jsonl"
    return metrics.is_file() and any(json.loads(line)["epoch"] == epochs
                                     for line in metrics.read_text().splitlines() if line.strip())


def train_command(run: Path, config: dict, data_root: str | None) -> list[str]:
    run.mkdir(parents=True, exist_ok=True)
    path = run / "run_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [sys.executable, "-m", "cli.main", "train", "--config", str(path), "--out", str(run)]
    if (run / "last.pt").exists():
        command.append("--resume")
    if data_root:
        command += ["--data-root", data_root]
    return command


def train_all(runs: dict[Path, dict], jobs: int, data_root: str | None) -> None:
    """Train every unfinished run, `jobs` processes at a time (one thread each)."""
    pending = [run for run, config in runs.items() if not finished(run, config["train"]["epochs"])]
    active: dict[Path, tuple[subprocess.Popen, object]] = {}
    while pending or active:
        while pending and len(active) < jobs:
            run = pending.pop(0)
            command = train_command(run, runs[run], data_root)
            log = open(run / "train.log", "a")  # noqa: SIM115 (closed when the process ends)
            print(f"training {run.name}", flush=True)
            active[run] = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log
        time.sleep(5)
        for run, (process, log) in list(active.items()):
            if process.poll() is not None:
                del active[run]
                log.close()
                if process.returncode != 0:
                    sys.exit(f"ablation: training {run.name} failed (exit {process.returncode}); see {run}/train.log")
                print(f"finished {run.name}", flush=True)


def test_accuracy(run: Path, data_root: str | None) -> dict:
    """`protoserve evaluate` of the run's best.pt (validation-chosen), kept in <run>/evaluation.json."""
    out = run / "evaluation.json"
    if not out.is_file():
        command = [sys.executable, "-m", "cli.main", "evaluate", "--checkpoint", str(run / "best.pt"),
                   "--out", str(out)]
        if data_root:
            command += ["--data-root", data_root]
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def metrics_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def table(results: dict[str, list[dict]]) -> list[str]:
    lines = [f"{'variant':<26} {'seeds':>5} {'test acc mean':>13} {'spread':>7} {'paper':>6} {'val acc':>7} "
             f"{'recon. error':>12} {'hours/run':>9}"]
    for variant, rows in results.items():
        tests = [r["test_accuracy"] for r in rows]
        spread = (max(tests) - min(tests)) / 2 if len(tests) > 1 else 0.0
        recon = [r["train_reconstruction_error"] for r in rows if "train_reconstruction_error" in r]
        lines.append(f"{variant:<26} {len(rows):>5} {100 * statistics.mean(tests):>12.2f}% {100 * spread:>6.2f}"
                     f" {100 * PAPER[variant]:>6.2f} {100 * statistics.mean(r['val_accuracy'] for r in rows):>7.2f}"
                     f" {statistics.mean(recon) if recon else float('nan'):>12.2f}"
                     f" {statistics.mean(r['wall_seconds'] for r in rows) / 3600:>9.2f}")
    return lines


def plot(runs: dict[str, list[Path]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for colour, (variant, paths) in zip(("tab:blue", "tab:orange", "tab:green"), runs.items(), strict=False):
        for i, run in enumerate(paths):
            rows = metrics_of(run)
            ax.plot([r["wall_seconds"] / 3600 for r in rows], [100 * r["val_accuracy"] for r in rows], color=colour,
                    alpha=0.8, linewidth=1, label=variant if i == 0 else None)
    ax.set_xlabel("wall-clock hours (one run, one thread of a 2-core CPU)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(98.0, 99.6)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110, bbox_inches="tight")
    print(f"written {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=BASE, help="the schedule every variant is trained on")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once (one thread each)")
    parser.add_argument("--epochs", type=int, help="override the schedule's epochs (a quick look, not the result)")
    parser.add_argument("--train-subset", type=int, help="train on the first N images (a quick look, not the result)")
    parser.add_argument("--out", default=str(REPO / "runs/ablation"))
    parser.add_argument("--data-root")
    parser.add_argument("--png", default=str(REPO / "docs/ablation_accuracy_vs_time.png"))
    args = parser.parse_args()

    started = time.perf_counter()
    out = Path(args.out)
    runs = {out / f"{v}_seed{s}": (v, run_config(args.base, v, s, args.epochs, args.train_subset))
            for v in args.variants for s in args.seeds}
    train_all({run: config for run, (_, config) in runs.items()}, args.jobs, args.data_root)

    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    paths: dict[str, list[Path]] = {v: [] for v in args.variants}
    for run, (variant, _) in runs.items():
        last = metrics_of(run)[-1]
        results[variant].append({**test_accuracy(run, args.data_root), "run": str(run),
                                 "wall_seconds": last["wall_seconds"]})
        paths[variant].append(run)
    lines = table(results)
    print("\n".join(lines))
    print(f"wall time of this command: {(time.perf_counter() - started) / 3600:.2f} h "
          f"({len(runs)} runs, {args.jobs} at a time)")
    (out / "ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(paths, Path(args.png))


if __name__ == "__main__":
    main()
