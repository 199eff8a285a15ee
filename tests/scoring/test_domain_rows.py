"""Batch rows carry in_domain and typicality: the service's rule, in the JSON Lines and Parquet outputs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
from scoring_helpers import write_idx

from bundle.manifest import read_bundle
from bundle.runtime import open_session
from inference.domain import domain_rule
from inference.explain import active_mask
from scoring.job import JobSpec
from scoring.run import run_scoring_job


def test_job_rows_carry_the_service_rule(tiny_bundle, digits, tmp_path):
    images = np.concatenate([digits[:6], np.full((2, 28, 28), 255, np.uint8)])  # digits, then white squares
    idx = write_idx(tmp_path / "images-idx3-ubyte", images)
    manifest = read_bundle(tiny_bundle).manifest
    session, _ = open_session(read_bundle(tiny_bundle).model_path, "cpu")
    rule = domain_rule(manifest, active_mask(manifest))
    assert rule.features == "latent"  # the latent space is one part of the score
    x = (images[:, None] / 255.0).astype(np.float32)
    p, d, f = session.run(["probabilities", "distances", "latent"], {"image": x})
    want_in, want_typical = rule.judge(d, p.argmax(axis=1), f)
    for out in (tmp_path / "rows.jsonl", tmp_path / "rows.parquet"):
        run_scoring_job(JobSpec(str(tiny_bundle), [str(idx)], out), progress=False)
        rows = [json.loads(line) for line in out.read_text().splitlines()] if out.suffix == ".jsonl" \
            else pq.read_table(out).to_pylist()
        assert [r["in_domain"] for r in rows] == want_in.tolist()
        np.testing.assert_allclose([r["typicality"] for r in rows], want_typical, atol=1e-6)
    assert not want_in[-2:].any()  # a white square is unlike every digit
