"""The out-of-domain figures written into a bundle at export (manifest domain.outliers).

The bundle's calibrated rule, through its model.onnx, on drawings that are not digits: letters, symbols
and animal silhouettes from the fonts and classes that outlier exposure holds out of training
(training/outliers.py, the "val" part, split by the checkpoint's own outlier_exposure settings), against
the test split. Every bundle gets them, trained with the term or not, so versions compare on the same
images: how many the bundle flags at its threshold, and how well its score ranks them (AUROC, FPR95).
They are not the `make bench-ood` figures: that benchmark's glyphs come from other fonts (DejaVu and
Liberation) on purpose.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np

from bundle.manifest import Manifest, OutlierFigures
from bundle.runtime import open_session
from export.calibration import auroc, fpr_at_tpr
from inference.domain import domain_rule
from inference.explain import active_mask
from inference.preprocess import normalize
from training.config import Config
from training.outliers import OutlierDataError, build_outliers, licences

SET = "non-digit drawings (letters, symbols, animal silhouettes) from held-out fonts and classes"


@functools.lru_cache(maxsize=2)
def held_out(sources: tuple[str, ...], val_share: float, seed: int):
    """The held-out outlier set (built once per process: rendering it takes seconds)."""
    return build_outliers(sources, "val", val_share, seed)


def outlier_figures(model_file: Path, manifest: Manifest, test_images: np.ndarray, config: Config,
                    run, log=print) -> OutlierFigures | None:
    """The figures of `manifest`'s calibrated rule (None, with a log line, when they cannot be measured).
    `run(session, x)` -> every output of the session by name."""
    spec = manifest.input
    rule = domain_rule(manifest, active_mask(manifest))
    if rule is None or (spec.channels, spec.height, spec.width) != (1, 28, 28):
        return None
    o = config.outlier_exposure
    try:
        outliers = held_out(tuple(o.sources), o.val_share, o.seed)
    except OutlierDataError as e:
        log(f"no out-of-domain figures on held-out outliers: {e}")
        return None
    low, high = spec.value_range
    x = normalize(outliers.images * (high - low) + low, spec)
    session, _ = open_session(model_file, device="cpu")

    def judged(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = run(session, images.astype(np.float32, copy=False))
        labels = out["probabilities"].argmax(axis=1)
        features = out[rule.features] if rule.features else None
        in_domain, _ = rule.judge(out["distances"], labels, features, flat=rule.flat(images))
        return rule.score(out["distances"], labels, features), in_domain

    test_score, test_in = judged(test_images)
    score, inside = judged(x)
    figures = OutlierFigures(
        set=SET, images=len(x), units=sorted(str(u) for u in set(outliers.units)), licences=licences(),
        test_images=len(test_images), flagged=float(np.mean(~inside)), test_flagged=float(np.mean(~test_in)),
        auroc=auroc(test_score, score), fpr95=fpr_at_tpr(test_score, score),
        trained_with=dataclasses.asdict(o) if o.weight > 0 else None)
    log(f"held-out outliers ({figures.images} images, {len(figures.units)} fonts and classes): "
        f"{figures.flagged:.1%} flagged, AUROC {figures.auroc:.4f}, FPR95 {figures.fpr95:.3f}")
    return figures
