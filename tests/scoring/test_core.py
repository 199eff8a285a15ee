"""The batch core without files: conversion as the service does it, top-k as the service does it."""

from __future__ import annotations

import numpy as np
import pytest
from scoring_helpers import png_bytes

from bundle.manifest import InputSpec, read_bundle
from bundle.runtime import classify, open_session
from inference.explain import nearest_prototypes, nearest_prototypes_batch, prototype_rows
from inference.preprocess import to_input
from scoring.inputs import RecordIds
from scoring.rows import BatchScorer, records_to_input

MNIST = InputSpec(channels=1, height=28, width=28, mean=[0.0], std=[1.0])


def test_nearest_prototypes_batch_is_the_service_top_k_row_by_row():
    rng = np.random.default_rng(0)
    distances = rng.integers(0, 4, size=(200, 9)).astype(np.float32)  # many exact ties
    active = np.array([True, False, True, True, True, False, True, True, True])
    got = nearest_prototypes_batch(distances, 4, active)
    for row, ids in zip(distances, got, strict=True):
        np.testing.assert_array_equal(ids, nearest_prototypes(row, 4, active))
    assert not np.isin(got, np.flatnonzero(~active)).any()


@pytest.mark.parametrize("lo, hi", [(0, 0), (0, 1), (5, 12), (9, 11), (95, 1003), (99_990, 100_010), (57_344, 60_000)])
def test_record_ids_as_arrow_are_the_ids_one_by_one(lo, hi):
    ids = RecordIds("data/é-images-idx3-ubyte.gz", lo, hi)  # a name with a multi-byte character
    column = ids.arrow()
    column.validate(full=True)
    assert column.to_pylist() == [ids[i] for i in range(len(ids))] == [f"data/é-images-idx3-ubyte.gz#{i}"
                                                                       for i in range(lo, hi)]


def test_uint8_records_convert_like_a_decoded_png(digits):
    x, errors = records_to_input(digits[:5], MNIST)
    assert errors == [None] * 5
    for i in range(5):
        np.testing.assert_array_equal(x[i], to_input(png_bytes(digits[i]), MNIST))


def test_float_records_out_of_range_or_nan_get_the_service_reasons(digits):
    values = digits[:4].astype(np.float32) / 255.0
    values[1, 3, 3] = np.nan
    values[2, 0, 0] = 1.5
    x, errors = records_to_input(values, MNIST)
    assert errors[0] is None and errors[3] is None
    assert errors[1].reason == "non_finite" and errors[2].reason == "out_of_range"
    np.testing.assert_allclose(x[3], values[3][None], atol=1e-7)


def test_wrong_size_records_are_errors_not_crashes():
    x, errors = records_to_input(np.zeros((3, 32, 32), np.uint8), MNIST)
    assert x.shape == (3, 1, 28, 28)
    assert all(e.reason == "wrong_shape" and "[1, 32, 32]" in str(e) for e in errors)


def test_scorer_rows_match_the_graph_and_keep_bad_inputs(tiny_bundle, digits):
    bundle = read_bundle(tiny_bundle)
    session, _ = open_session(bundle.model_path, "cpu")
    scorer = BatchScorer(bundle.manifest, top_k=2)

    def infer(x):  # what the engines pass: the outputs the scorer's out-of-domain rule needs
        return classify(session, x, scorer.features)

    inputs = [png_bytes(digits[0]), b"not a picture", digits[1], png_bytes(digits[2], "JPEG"), [[0.5] * 3]]
    cols = scorer.score(10, [f"i{j}" for j in range(5)], inputs, infer)
    rows = cols.records()
    assert [r["index"] for r in rows] == [10, 11, 12, 13, 14]
    assert [r["error"] is None for r in rows] == [True, False, True, True, False]
    assert rows[1]["error"].startswith("not_an_image:") and rows[4]["error"].startswith("wrong_shape:")
    p, d, *_ = infer(np.stack([to_input(png_bytes(digits[0]), bundle.manifest.input)]))
    assert rows[0]["probabilities"] == pytest.approx(p[0].tolist(), abs=1e-6)
    assert rows[0]["label"] == int(p[0].argmax())
    assert rows[0]["class_name"] == bundle.manifest.class_names[rows[0]["label"]]
    active = np.array([r.status == "active" for r in bundle.manifest.prototypes])
    nearest = nearest_prototypes(d[0], 2, active)
    assert rows[0]["prototype_ids"] == [bundle.manifest.prototypes[j].id for j in nearest]
    assert rows[0]["prototype_distances"] == pytest.approx(d[0][nearest].tolist(), rel=1e-6)
    p2, *_ = infer(np.stack([to_input(png_bytes(digits[1]), bundle.manifest.input)]))
    assert rows[2]["probabilities"] == pytest.approx(p2[0].tolist(), abs=1e-6)  # a uint8 record = its PNG
    assert {r["model_name"] for r in rows} == {bundle.manifest.name}


@pytest.mark.parametrize("which", ["tiny_bundle", "tiny_protopnet_bundle"])
def test_rows_carry_the_explanations_ids_and_scores(which, request, digits):
    """Both families: a row's prototypes are /explain's top-k entries (inference.explain.prototype_rows),
    with the same distance, similarity and contribution to the predicted class."""
    bundle = read_bundle(request.getfixturevalue(which))
    session, _ = open_session(bundle.model_path, "cpu")
    scorer = BatchScorer(bundle.manifest, top_k=3)

    def infer(x):  # what the engines pass: the outputs the scorer's out-of-domain rule needs
        return classify(session, x, scorer.features)

    rows = scorer.score(0, ["a", "b", "c"], [png_bytes(digits[i]) for i in range(3)], infer).records()
    active = np.array([r.status == "active" for r in bundle.manifest.prototypes])
    for i, row in enumerate(rows):
        p, d, *_ = infer(to_input(png_bytes(digits[i]), bundle.manifest.input)[None])
        label = int(p[0].argmax())
        want = prototype_rows(bundle.manifest, d[0], nearest_prototypes(d[0], 3, active), label)
        assert row["prototype_ids"] == [w["id"] for w in want]
        assert row["prototype_similarities"] == pytest.approx([w["similarity"] for w in want], rel=1e-5)
        assert row["prototype_contributions"] == pytest.approx([w["contribution"] for w in want], rel=1e-5, abs=1e-6)
    if bundle.manifest.family == "protopnet":  # nearest first = most similar first
        assert all(r["prototype_similarities"] == sorted(r["prototype_similarities"], reverse=True) for r in rows)


def test_local_sessions_run_the_graph_cut_to_what_rows_read(tiny_bundle, tmp_path):
    """Batch scoring, like the service, does not run PrototypeDL's decoder: every worker's session
    lacks the reconstruction output and gives the whole graph's numbers."""
    from inference.model import classifier_outputs
    from scoring.job import Job, JobSpec
    from scoring.local_engine import open_sessions

    job = Job(JobSpec(str(tiny_bundle), [], tmp_path / "out.jsonl", workers=2))
    sessions, _ = open_sessions(job)
    assert len(sessions) == 2
    with np.load(tiny_bundle / "probe.npz") as probe:
        images = probe["input.image"].astype(np.float32)
    whole, _ = open_session(tiny_bundle / "model.onnx", "cpu")
    for session in sessions:
        assert [o.name for o in session.get_outputs()] == classifier_outputs(job.bundle)
        for cut, reference in zip(classify(session, images), classify(whole, images), strict=True):
            np.testing.assert_array_equal(cut, reference)


@pytest.mark.parametrize("workers, cores, threads", [(1, 2, 1), (2, 2, 1), (1, 1, 1), (1, 8, 7), (2, 8, 3), (8, 8, 1)])
def test_sessions_leave_a_core_to_the_rest_of_the_job(workers, cores, threads):
    from scoring.local_engine import session_threads

    assert session_threads(workers, cores) == threads
