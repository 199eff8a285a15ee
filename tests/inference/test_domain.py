"""The out-of-domain rule on the serving side: a bundle reads the features its calibration names, and a
bundle exported before ProtoPNet's graph had `pooled_latent` still loads and is judged from its distances."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import onnx
import pytest

from bundle.manifest import InputSpec, read_bundle, write_manifest
from bundle.runtime import classify, open_session, verify_bundle
from export.calibration import calibrate
from inference.domain import domain_rule, flat_spread
from inference.explain import active_mask, nearest_distance
from inference.explanation import Explainer
from inference.model import load_model
from protoserve.domain_scores import tail_at
from scoring.rows import BatchScorer
from training.mnist import load_split


@pytest.fixture(scope="module")
def test_images(mnist_root) -> np.ndarray:
    """The first 2,000 MNIST test digits as model input [2000, 1, 28, 28]."""
    images, _ = load_split(mnist_root, "mnist", "test")
    return (images[:2000].astype(np.float32) / 255.0)[:, None]


def older_protopnet_bundle(bundle, folder, images):
    """`bundle` as an export before the features output wrote it: no pooled_latent in the graph or the
    manifest, and a calibration of the distances alone (on `images`, standing in for the validation split)."""
    shutil.copytree(bundle, folder)
    m = read_bundle(bundle).manifest
    session, _ = open_session(read_bundle(bundle).model_path, "cpu")
    class_of = np.array([row.class_identity for row in m.prototypes])
    domain = calibrate(lambda x: (*classify(session, x), None), images, active_mask(m), class_of, len(m.class_names))
    graph = onnx.load(str(folder / "model.onnx"))
    kept = [o for o in graph.graph.output if o.name != "pooled_latent"]
    del graph.graph.output[:]
    graph.graph.output.extend(kept)
    onnx.save(graph, str(folder / "model.onnx"))
    outputs = [t for t in m.model.outputs if t.name != "pooled_latent"]
    write_manifest(folder, m.model_copy(update={"model": m.model.model_copy(update={"outputs": outputs}),
                                                "domain": domain}))
    return folder


def test_a_new_protopnet_bundle_reads_its_pooled_latent(tiny_protopnet_bundle, test_images):
    manifest = read_bundle(tiny_protopnet_bundle).manifest
    rule = domain_rule(manifest, active_mask(manifest))
    assert manifest.domain.score == "latent_and_prototypes" and rule.features == "pooled_latent"
    session, _ = open_session(read_bundle(tiny_protopnet_bundle).model_path, "cpu")
    p, d, f = classify(session, test_images[:50], "pooled_latent")
    assert f.shape == (50, 16)
    in_domain, _ = rule.judge(d, p.argmax(axis=1), f)
    assert in_domain.mean() > 0.8  # test digits are mostly in domain
    white = np.ones((2, 1, 28, 28), np.float32)
    p, d, f = classify(session, white, "pooled_latent")
    assert not rule.judge(d, p.argmax(axis=1), f)[0].any()


def test_an_older_bundle_without_the_features_still_loads_and_is_judged(tiny_protopnet_bundle, test_images,
                                                                        tmp_path):
    old = older_protopnet_bundle(tiny_protopnet_bundle, tmp_path / "older", test_images[1000:])
    bundle, _ = verify_bundle(old)  # checksums and the golden probe
    assert "pooled_latent" not in bundle.output_names
    model = load_model(old)
    rule = domain_rule(bundle.manifest, model.active)
    assert rule.features is None and bundle.manifest.domain.score == "nearest_and_mahalanobis"
    x = np.concatenate([test_images[:20], np.ones((2, 1, 28, 28), np.float32)])
    p, d = model.classify(x)
    in_domain, typicality = rule.judge(d, p.argmax(axis=1), flat=rule.flat(x))
    assert not in_domain[-2:].any() and in_domain[:20].mean() > 0.8
    scorer = BatchScorer(bundle.manifest)
    assert scorer.features is None and scorer.feature_width == 0
    rows = scorer.score(0, [str(i) for i in range(len(x))], list(x[:, 0].tolist()), model.classify)
    np.testing.assert_array_equal(rows.in_domain, in_domain)
    np.testing.assert_allclose(rows.typicality, typicality, atol=1e-6)


def test_the_joint_product_scores_as_the_parts_do(tiny_bundle, test_images):
    """Both Mahalanobis parts from one block-diagonal product give the scores of the two separate products
    (the calibration's definitions in protoserve/domain_scores.py)."""
    import dataclasses

    manifest = read_bundle(tiny_bundle).manifest
    rule = domain_rule(manifest, active_mask(manifest))
    assert rule.joint_means is not None
    separate = dataclasses.replace(rule, joint_means=None, joint_precision=None)
    session, _ = open_session(read_bundle(tiny_bundle).model_path, "cpu")
    x = np.concatenate([test_images[:200], np.ones((3, 1, 28, 28), np.float32), 1.0 - test_images[:20]])
    p, d, f = classify(session, x, "latent")
    y = p.argmax(axis=1)
    np.testing.assert_allclose(rule.score(d, y, f), separate.score(d, y, f), rtol=1e-12)
    np.testing.assert_array_equal(rule.judge(d, y, f)[0], separate.judge(d, y, f)[0])


def test_a_judgement_given_the_nearest_distances_is_the_same(tiny_bundle, test_images):
    """The service hands the judgement the nearest distances it has counted already: the same answers bit for
    bit as the rule finding them itself, in a batch and one image at a time."""
    manifest = read_bundle(tiny_bundle).manifest
    active = active_mask(manifest)
    active[1] = False  # a masked prototype is out of reach in both
    rule = domain_rule(manifest, active)
    session, _ = open_session(read_bundle(tiny_bundle).model_path, "cpu")
    x = np.concatenate([test_images[:100], np.ones((3, 1, 28, 28), np.float32), 1.0 - test_images[:20]])
    p, d, f = classify(session, x, "latent")
    y = p.argmax(axis=1)
    nearest = nearest_distance(d, active)
    for rows in (slice(None), slice(0, 1), slice(101, 102)):
        own, given = rule.judge(d[rows], y[rows], f[rows]), rule.judge(d[rows], y[rows], f[rows], nearest[rows])
        np.testing.assert_array_equal(own[0], given[0])
        np.testing.assert_array_equal(own[1], given[1])


def test_tail_at_is_numpys_interpolation():
    """tail_at calls np.interp's compiled core directly: the same numbers, edges, ties and NaN included."""
    quantiles = np.array([0.1, 0.2, 0.2, 0.5, 1.0, 3.0])
    tails = 1.0 - np.array([0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
    scores = np.array([-1.0, 0.0, 0.1, 0.15, 0.2, 0.2000001, 0.5, 0.7, 1.0, 2.9, 3.0, 3.5, np.inf, np.nan])
    np.testing.assert_array_equal(tail_at(scores, quantiles, tails),
                                  np.interp(scores, quantiles, tails, left=1.0, right=0.0))
    np.testing.assert_array_equal(tail_at(scores[:1], list(quantiles), tails),
                                  np.interp(scores[:1], list(quantiles), tails, left=1.0, right=0.0))


def test_a_flat_picture_is_out_of_domain_whatever_its_score(tiny_bundle, test_images):
    """A blank canvas, a uniform grey, or one with a grey level of JPEG noise: nothing drawn, so out of domain with
    typicality 0, even under a threshold every score passes; a digit is judged by its score as before, also in
    the batch rows and in `protoserve explain`'s code."""
    model = load_model(tiny_bundle)
    manifest = model.bundle.manifest
    rule = domain_rule(manifest, model.active)
    lenient = dataclasses.replace(rule, calibration=manifest.domain.model_copy(update={"threshold": 1e30}))
    rng = np.random.default_rng(0)
    flat = np.stack([np.zeros((1, 28, 28)), np.ones((1, 28, 28)), np.full((1, 28, 28), 0.5),
                     0.5 + rng.integers(-1, 2, (1, 28, 28)) / 255.0]).astype(np.float32)
    faint = (0.5 + rng.integers(-3, 4, (2, 1, 28, 28)) / 255.0).astype(np.float32)  # 6 levels apart: not flat
    x = np.concatenate([test_images[:20], flat, faint])
    p, d, f = model.classify(x, rule.features)
    np.testing.assert_array_equal(rule.flat(x), [False] * 20 + [True] * 4 + [False] * 2)
    in_domain, typicality = lenient.judge(d, p.argmax(axis=1), f, flat=rule.flat(x))
    assert in_domain[:20].all() and in_domain[-2:].all() and not in_domain[20:24].any()
    assert (typicality[20:24] == 0).all()
    scored, _ = lenient.judge(d, p.argmax(axis=1), f)  # without the check the lenient score lets them all in
    assert scored.all()
    want_in, want_typical = rule.judge(d, p.argmax(axis=1), f, flat=rule.flat(x))
    assert not want_in[20:24].any()
    rows = BatchScorer(manifest).score(0, [str(i) for i in range(len(x))], list(x[:, 0].tolist()),
                                       lambda batch: model.classify(batch, rule.features))
    np.testing.assert_array_equal(rows.in_domain, want_in)
    np.testing.assert_allclose(rows.typicality, want_typical, atol=1e-6)
    explained = Explainer(model).explain(flat[0], top_k=1, abstain=True)
    assert explained["prediction"]["in_domain"] is False and explained["prediction"]["abstained"] is True


def test_the_flat_spread_is_two_grey_levels_in_the_models_input_space(tiny_bundle):
    spec = InputSpec(channels=3, height=4, width=4, mean=[0.5, 0.4, 0.3], std=[0.25, 0.5, 0.2])
    np.testing.assert_allclose(flat_spread(spec), np.array([2, 2, 2]) / 255.0 / np.array([0.25, 0.5, 0.2]))
    manifest = read_bundle(tiny_bundle).manifest
    rule = dataclasses.replace(domain_rule(manifest, active_mask(manifest)), flat_spread=flat_spread(spec))
    grey = np.full((2, 3, 4, 4), 0.1, np.float32)
    grey[1, 2, 0, 0] += 3 / 255.0 / 0.2  # three levels on the third channel only: something is there
    np.testing.assert_array_equal(rule.flat(grey), [True, False])
    assert rule.flat(grey[:0]).shape == (0,)  # a chunk with no good input
