"""The out-of-domain figures every bundle carries (manifest domain.outliers, export/outlier_figures.py):
measured on the held-out outlier fonts and classes through the bundle's own rule, shown by the registry's
version rows."""

from __future__ import annotations

import numpy as np

from bundle.manifest import read_bundle
from bundle.runtime import open_session
from export.build import run_onnx
from export.outlier_figures import held_out, outlier_figures
from inference.domain import domain_rule
from inference.explain import active_mask
from registry.versions import version_metrics
from training.config import Config
from training.outliers import SOURCES, split_units


def test_a_bundle_carries_the_rule_measured_on_held_out_outliers(tiny_bundle):
    m = read_bundle(tiny_bundle).manifest
    o = m.domain.outliers
    outliers = held_out(SOURCES, 0.25, 0)
    held = {f"{s}:{u}" for s in SOURCES for u in split_units(s, 0.25, 0)["val"]}
    assert set(o.units) == held and o.images == len(outliers) and o.test_images == 1000
    assert o.trained_with is None and o.licences["Hershey-Fonts"].startswith("MIT")
    # the flagged share, recomputed here through the bundle's session and its own rule
    rule = domain_rule(m, active_mask(m))
    session, _ = open_session(read_bundle(tiny_bundle).model_path, device="cpu")
    x = (outliers.images - m.input.mean[0]) / m.input.std[0]
    out = run_onnx(session, x.astype(np.float32))
    features = out[rule.features] if rule.features else None
    in_domain, _ = rule.judge(out["distances"], out["probabilities"].argmax(1), features, flat=rule.flat(x))
    assert abs(o.flagged - float(np.mean(~in_domain))) < 1e-9
    assert 0.5 <= o.auroc <= 1 and 0 <= o.fpr95 <= 1
    assert version_metrics(m) == {"test_accuracy": m.metrics.test_accuracy, "outliers_flagged": o.flagged,
                                  "outliers_fpr95": o.fpr95, "outlier_exposure": False}


def test_a_checkpoint_trained_with_the_term_records_it(tiny_bundle):
    bundle = read_bundle(tiny_bundle)
    config = Config.from_dict({"outlier_exposure": {"weight": 0.5, "pull_digits": False}})
    test = np.zeros((20, 1, 28, 28), np.float32)
    test[:, :, 10:18, 12:16] = 1.0
    o = outlier_figures(bundle.model_path, bundle.manifest, test, config, run_onnx, log=lambda s: None)
    assert o.trained_with["weight"] == 0.5 and o.trained_with["pull_digits"] is False and o.test_images == 20


def test_no_figures_for_inputs_the_outliers_cannot_be(tiny_bundle):
    bundle = read_bundle(tiny_bundle)
    rgb = bundle.manifest.model_copy(update={"input": bundle.manifest.input.model_copy(update={"channels": 3})})
    assert outlier_figures(bundle.model_path, rgb, np.zeros((2, 3, 28, 28), np.float32), Config(), run_onnx) is None
