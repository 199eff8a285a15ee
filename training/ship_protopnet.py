"""Copy a finished ProtoPNet run into the shipped model folder: `python -m training.ship_protopnet`.

    <out>/checkpoint.pt    best.pt (the pushed model with the best validation accuracy), without
                           optimizer state: the weights, config, epoch and metrics
    <out>/config.yaml      the run's config
    <out>/metrics.jsonl    one line per epoch
    <out>/push/            the pictures of the push that produced checkpoint.pt
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from training.checkpoint import load_checkpoint, save_checkpoint


def ship(run: Path, out: Path, checkpoint: str = "best.pt") -> Path:
    model, config, payload = load_checkpoint(run / checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "checkpoint.pt", model, config, payload["epoch"], payload["metrics"], None)
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copyfile(run / name, out / name)
    pictures = run / "push" / f"epoch_{payload['epoch']:04d}"
    shutil.rmtree(out / "push", ignore_errors=True)
    shutil.copytree(pictures, out / "push")
    return out / "checkpoint.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--checkpoint", default="best.pt", help="which checkpoint of the run (default best.pt)")
    args = parser.parse_args()
    print(f"shipped {ship(args.run, args.out, args.checkpoint)}")


if __name__ == "__main__":
    main()
