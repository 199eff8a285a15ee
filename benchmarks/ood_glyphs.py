"""Why the glyph target is missed: the single-stroke symbols (`/ | \\ ( ) [ ] ! '`, benchmarks/ood_sets.py
STROKES) against the rest of the glyphs, under every view of the input this machine offers.

For each shipped checkpoint and each of its convolution layers (in the order they run):
    layer Mahalanobis   channel means and standard deviations over positions, class-conditional on
                        the predicted label, shared covariance, fitted on the validation split
                        (Lee et al. 2018, one layer at a time)
    layer deep kNN      distance to the 10th nearest of 20,000 training images, activations flattened
                        and L2-normalised (Sun et al. 2022)
and, model-free, the pixel distance to the 5th nearest of the 55,000 training images; then every
layer's Mahalanobis score and the bundle's own calibrated score (models/<name>/bundle beside the
checkpoint) in one, by Fisher's method as the bundle combines its parts. Each row gives
AUROC / FPR at 95% TPR against the MNIST test set, for the strokes and for the other glyphs, as
benchmarks/ood.py measures them. An AUROC under 0.5 means the view finds the strokes *more* typical
than the test digits.

    PYTHONPATH=. .venv/bin/python -m benchmarks.ood_glyphs [--checkpoints models/prototypedl_mnist/checkpoint.pt ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.ood import Scorer
from benchmarks.ood_sets import STROKES, glyphs_with_characters
from export.calibration import LEVELS, auroc, fit_gaussian, fpr_at_tpr
from protoserve.domain_scores import fisher, squared_mahalanobis, upper_tail
from training.checkpoint import load_checkpoint
from training.mnist import load_mnist
from training.splits import resolve_data_root

CHECKPOINTS = ["models/prototypedl_mnist/checkpoint.pt", "models/protopnet_mnist/checkpoint.pt"]
BANK = 20_000  # training images in the deep kNN bank
BATCH = 1000


def layer_activations(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], np.ndarray]:
    """Every Conv2d output of images x [N, 1, 28, 28] (in the order they run) and the predicted labels."""
    found: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: found.append(out)) for m in model.modules()
             if isinstance(m, nn.Conv2d)]
    batches, labels = [], []
    try:
        with torch.no_grad():
            for i in range(0, len(x), BATCH):
                found.clear()
                labels.append(model(x[i:i + BATCH]).logits.argmax(dim=1))
                batches.append(list(found))
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(layer) for layer in zip(*batches, strict=True)], torch.cat(labels).numpy()


def kth_distance(x: torch.Tensor, bank: torch.Tensor, k: int) -> np.ndarray:
    """[N] Euclidean distance from each row of x to its k-th nearest row of bank."""
    return torch.cat([torch.cdist(x[i:i + BATCH], bank).topk(k, largest=False).values[:, -1]
                      for i in range(0, len(x), BATCH)]).numpy()


def channel_stats(a: torch.Tensor) -> np.ndarray:
    return torch.cat([a.mean(dim=(2, 3)), a.std(dim=(2, 3))], dim=1).double().numpy()


def row(name: str, test: np.ndarray, glyph: np.ndarray, stroke: np.ndarray) -> str:
    parts = [f"{auroc(test, glyph[m]):.3f} / {fpr_at_tpr(test, glyph[m]):.3f}" for m in (stroke, ~stroke)]
    return f"{name:34s} {parts[0]:>16s} {parts[1]:>16s}"


def layer_mahalanobis(fit: list[torch.Tensor], fit_labels: np.ndarray,
                      views: dict[str, tuple[list[torch.Tensor], np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Per layer, each view's [N] Mahalanobis scores of its channel statistics, class-conditional on its
    predicted labels, fitted on the `fit` activations."""
    out = []
    for i, a_fit in enumerate(fit):
        means, precision = fit_gaussian(channel_stats(a_fit), fit_labels, 10)
        out.append({view: squared_mahalanobis(channel_stats(layers[i]), labels, means, precision)
                    for view, (layers, labels) in views.items()})
    return out


def combined(parts: list[dict[str, np.ndarray]], view: str) -> np.ndarray:
    """Fisher's combination of the parts' tails under their scores on the held-out validation half."""
    return fisher([upper_tail(part[view], np.quantile(part["held"], LEVELS), LEVELS) for part in parts])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoints", nargs="+", default=CHECKPOINTS)
    p.add_argument("--data-root")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    data = load_mnist(resolve_data_root(args.data_root))
    train, val, test = data["train"].images, data["val"].images, data["test"].images
    order = np.random.default_rng(0).permutation(len(val))  # fit on one half, tails from the other
    fit_half, held_half = val[order[:len(val) // 2]], val[order[len(val) // 2:]]
    images, characters = glyphs_with_characters()
    glyph = torch.from_numpy(images)
    stroke = np.isin(characters, list(STROKES))
    print(f"{len(glyph)} glyphs, {stroke.sum()} single strokes ({stroke.mean():.1%}); AUROC / FPR95 against "
          f"{len(test)} test digits")
    print(f"{'view':34s} {'single strokes':>16s} {'other glyphs':>16s}")
    print(row("pixels, 5-NN of 55,000 training", kth_distance(test.flatten(1), train.flatten(1), 5),
              kth_distance(glyph.flatten(1), train.flatten(1), 5), stroke))
    for path in args.checkpoints:
        model, config, _ = load_checkpoint(Path(path))
        family = config.model.family
        fit, fit_labels = layer_activations(model, fit_half)
        views = {"held": layer_activations(model, held_half), "test": layer_activations(model, test),
                 "glyphs": layer_activations(model, glyph)}
        bank, _ = layer_activations(model, train[:BANK])
        print(f"{family}: strokes predicted as 1: {np.mean(views['glyphs'][1][stroke] == 1):.1%}")
        layers = layer_mahalanobis(fit, fit_labels, views)
        for i, scores in enumerate(layers):
            print(row(f"{family} conv {i}, Mahalanobis", scores["test"], scores["glyphs"], stroke))
            normal = [nn.functional.normalize(views[v][0][i].flatten(1), dim=1) for v in ("test", "glyphs")]
            bank_i = nn.functional.normalize(bank[i].flatten(1), dim=1)
            print(row(f"{family} conv {i}, deep kNN", kth_distance(normal[0], bank_i, 10),
                      kth_distance(normal[1], bank_i, 10), stroke))
        scorer = Scorer(str(Path(path).parent / "bundle"))
        bundle = {"held": scorer.scores(held_half.numpy())["prototype"],
                  "test": scorer.scores(test.numpy())["prototype"], "glyphs": scorer.scores(images)["prototype"]}
        for name, parts in (("bundle score", [bundle]), ("all layers + bundle score", [*layers, bundle])):
            clean, ood = combined(parts, "test"), combined(parts, "glyphs")
            print(row(f"{family} {name}", clean, ood, stroke) + f"   all glyphs {auroc(clean, ood):.3f} / "
                  f"{fpr_at_tpr(clean, ood):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
