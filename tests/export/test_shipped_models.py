"""The shipped bundles: they verify, and the test accuracy their manifests claim is what ONNX
Runtime gets on the MNIST test set now (the README's results table quotes these manifests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bundle.runtime import open_session, verify_bundle
from scoring.rows import grey_levels_to_input
from training.mnist import load_split

MODELS = Path(__file__).resolve().parents[2] / "models"
# the accuracy each shipped model must keep (prototypedl_mnist_headline: the paper's 99.22%)
SHIPPED = {"prototypedl_mnist_headline": 0.9922, "prototypedl_mnist": 0.99, "protopnet_mnist": 0.99,
           # the outlier-exposure candidates, at what they reached (issue 23 asks for the parent's accuracy
           # less 0.1 point; both candidates miss that: docs/results.md)
           "prototypedl_mnist_oe": 0.990, "protopnet_mnist_oe": 0.988}
# the candidates trained with outlier exposure (issue 23) and the shipped bundle each descends from
OE_CANDIDATES = {"prototypedl_mnist_oe": "prototypedl_mnist_headline", "protopnet_mnist_oe": "protopnet_mnist"}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_bundle_verifies_and_reaches_its_accuracy_on_the_test_set(name, mnist_root):
    bundle, _ = verify_bundle(MODELS / name / "bundle")
    claimed = bundle.manifest.metrics.test_accuracy
    assert claimed >= SHIPPED[name]
    images, labels = load_split(mnist_root, "mnist", "test")
    session, _ = open_session(bundle.model_path, "cpu")
    x = grey_levels_to_input(images[:, None], bundle.manifest.input)
    predicted = np.concatenate([session.run(["probabilities"], {"image": x[i:i + 1000]})[0].argmax(axis=1)
                                for i in range(0, len(x), 1000)])
    assert float((predicted == labels).mean()) == pytest.approx(claimed, abs=1e-4)


def test_every_shipped_protopnet_prototype_sits_on_a_patch_of_its_own_class():
    bundle, _ = verify_bundle(MODELS / "protopnet_mnist" / "bundle")
    rows = bundle.manifest.prototypes
    assert len(rows) == 50
    assert all(row.provenance["source_label"] == row.class_identity for row in rows)
    assert all(bundle.file(row.provenance["source_image"]).is_file() for row in rows)


@pytest.mark.parametrize("name", sorted(OE_CANDIDATES))
def test_outlier_exposure_candidates_descend_from_the_shipped_bundles_and_say_how_they_were_trained(name):
    bundle, _ = verify_bundle(MODELS / name / "bundle")
    parent, _ = verify_bundle(MODELS / OE_CANDIDATES[name] / "bundle")
    m, p = bundle.manifest, parent.manifest
    assert m.name == p.name and m.lineage.parent == p.tag and m.lineage.mode == "retrain"
    outliers = m.domain.outliers
    assert outliers.trained_with["weight"] > 0 and outliers.trained_with["pull_digits"] is False
    assert outliers.fpr95 <= 0.06 and outliers.flagged >= 0.7  # held-out fonts and classes never trained on
    assert abs(m.domain.false_alarm_rate - p.domain.false_alarm_rate) < 1e-12  # calibrated as the parent


@pytest.mark.parametrize("name", sorted(OE_CANDIDATES))
def test_an_outlier_exposure_candidate_registers_beside_its_parent_and_can_be_promoted(name, tmp_path):
    """`make register-oe`: the parent active, the candidate registered with it as parent (status "candidate"),
    then promoted ("released")."""
    from cli.main import main
    from registry.versions import Registry

    root = str(tmp_path / "registry")
    parent, candidate = MODELS / OE_CANDIDATES[name], MODELS / name
    grandparent = [(MODELS / "prototypedl_mnist", [])] if name == "prototypedl_mnist_oe" else []  # 2.0.0's parent
    for model, extra in (*grandparent, (parent, ["--promote"]), (candidate, ["--candidate"])):
        assert main(["registry", "--registry", root, "register", str(model / "bundle"), "--checkpoint",
                     str(model / "checkpoint.pt"), "--if-missing", *extra]) in (0, None)
    registry = Registry(root)
    p, c = (verify_bundle(model / "bundle")[0].manifest for model in (parent, candidate))
    row = registry.store.version(c.version)
    assert registry.store.active().version == p.version and row.parent == p.version and row.status == "candidate"
    assert registry.store.version(p.version).status == "registered"
    assert row.metrics["outliers_fpr95"] == pytest.approx(c.domain.outliers.fpr95)
    assert registry.promote(c.version, actor="test").version == c.version
    assert registry.store.active().previous == p.version and registry.store.version(c.version).status == "released"


def histogram_quantile(q: float, values: np.ndarray, buckets: tuple[float, ...]) -> float:
    """Prometheus' histogram_quantile over `values` observed into `buckets` (linear within a bucket)."""
    bounds = np.asarray(buckets)
    counts = np.array([(values <= b).sum() for b in bounds])
    rank = q * len(values)
    i = int(np.searchsorted(counts, rank))
    lower, below = (0.0, 0) if i == 0 else (bounds[i - 1], counts[i - 1])
    return float(lower + (bounds[i] - lower) * (rank - below) / (counts[i] - below))


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_the_drift_alert_stays_quiet_on_the_test_set_itself(name, mnist_root):
    """monitoring/alerts.yml: histogram_quantile(0.5) of protoserve_nearest_distance against the
    manifest's 95th percentile. Fed the test set, the histogram's median must stay below it."""
    from service.metrics import DISTANCE_BUCKETS

    bundle, _ = verify_bundle(MODELS / name / "bundle")
    images, _ = load_split(mnist_root, "mnist", "test")
    session, _ = open_session(bundle.model_path, "cpu")
    x = grey_levels_to_input(images[:, None], bundle.manifest.input)
    nearest = np.concatenate([session.run(["distances"], {"image": x[i:i + 1000]})[0].min(axis=1)
                              for i in range(0, len(x), 1000)])
    reference = bundle.manifest.metrics.nearest_distance_quantiles
    assert reference["0.95"] == pytest.approx(float(np.quantile(nearest, 0.95)), rel=1e-4)
    assert histogram_quantile(0.5, nearest, DISTANCE_BUCKETS) < reference["0.95"]


@pytest.mark.slow
def test_protoserve_evaluate_on_the_shipped_default_checkpoint_reaches_the_papers_figure(mnist_root):
    """Issue 24's must-show: `protoserve evaluate` on the shipped checkpoint prints >= 99.22% on the test set."""
    import json
    import subprocess
    import sys

    checkpoint = MODELS / "prototypedl_mnist_headline" / "checkpoint.pt"
    result = subprocess.run([sys.executable, "-m", "cli.main", "evaluate", "--checkpoint", str(checkpoint),
                             "--data-root", str(mnist_root)], capture_output=True, text=True, timeout=600,
                            cwd=MODELS.parent)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["test_accuracy"] >= 0.9922
    assert figures["train_reconstruction_error"] < 5.0  # the paper: 4.22
