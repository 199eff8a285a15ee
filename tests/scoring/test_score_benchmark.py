"""benchmarks/score.py's memory figure is the job's own peak, whatever the size of the process measuring it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scoring_helpers import write_idx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from score import peak_rss  # noqa: E402


def test_peak_rss_does_not_count_the_measuring_process(tiny_bundle, digits, tmp_path):
    # A child forked from this process would start as a copy of it, and Linux counts that copy in the
    # child's ru_maxrss. Hold 1.2 GiB here: a job on 200 images (~450 MiB with the CUDA provider's
    # libraries loaded) must still report less than that.
    ballast = np.ones(1200 * 2**20 // 8)
    idx = write_idx(tmp_path / "images-idx3-ubyte", digits[:200])
    rss, seconds = peak_rss(tiny_bundle, idx, tmp_path / "out.parquet", workers=1)
    assert ballast.sum() > 0 and seconds > 0
    assert 30 < rss < 1000, rss
    assert (tmp_path / "out.parquet").is_file()
