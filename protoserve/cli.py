"""`protoserve <verb>`: the one command-line entry point.

Each verb imports its part only when it runs, so verbs for serving and bundles work without
torch installed. A ProtoserveError from any part becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from protoserve.errors import ProtoserveError


def _train(args) -> None:
    from training.config import load_config
    from training.data import resolve_data_root
    from training.train import Trainer

    config = load_config(args.config)
    if args.epochs is not None:
        config.train.epochs = args.epochs
    if args.device is not None:
        config.train.device = args.device
    root = resolve_data_root(args.data_root, config.data.root)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    trainer = Trainer(config, out, data_root=root)
    if args.resume:
        trainer.resume()
    elif (out / "last.pt").exists():
        raise ProtoserveError(f"{out}: holds a run already; pass --resume to continue it or choose another --out")
    trainer.fit()
    print(f"run written to {out} (best.pt: best validation accuracy {trainer.best_val_accuracy:.4f})")


def _evaluate(args) -> None:
    import json

    from training.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(Path(args.checkpoint), args.data_root, args.batch_size)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _visualize(args) -> None:
    from training.visualize import visualize_checkpoint

    written = visualize_checkpoint(Path(args.checkpoint), Path(args.out), args.data_root, args.metrics)
    for path in written:
        print(path)


def _download(args) -> None:
    from training.data import download

    download(Path(args.data_root), args.dataset)
    print(f"{args.dataset} written under {args.data_root}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="protoserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("--data-root", help="folder with the IDX files (default: $PROTOSERVE_DATA_ROOT)")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--device", help="override train.device (cpu, cuda, auto)")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="test accuracy and training-set reconstruction error")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-root")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--out", help="also write the figures as JSON here")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("visualize", help="PNG pictures of the paper's figures and the training curves")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--data-root")
    p.add_argument("--metrics", help="metrics.jsonl for the curves (default: beside the checkpoint)")
    p.set_defaults(func=_visualize)

    p = sub.add_parser("download", help="fetch MNIST or Fashion-MNIST with torchvision's downloader")
    p.add_argument("--data-root", required=True)
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist"])
    p.set_defaults(func=_download)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ProtoserveError as e:
        print(f"protoserve {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"protoserve {args.verb}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
