"""Without MNIST the suite stops with one line saying what is missing and how to get it (never skips)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_an_empty_data_root_stops_the_run_with_one_line(tmp_path):
    empty = tmp_path / "no_mnist"
    empty.mkdir()
    env = {**os.environ, "PROTOSERVE_DATA_ROOT": str(empty), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/training/test_data.py::test_paper_split_sizes_and_pixel_range"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 4, result.stdout + result.stderr  # pytest's usage error: not a pass, not a skip
    lines = [line for line in result.stdout.splitlines() if "MNIST is missing" in line]
    assert len(lines) == 1, result.stdout
    assert str(empty) in lines[0] and "make data" in lines[0] and "PROTOSERVE_DATA_ROOT" in lines[0]
    assert "train-images-idx3-ubyte" in lines[0]
    assert "skipped" not in result.stdout and "passed" not in result.stdout
    assert list(empty.iterdir()) == []  # nothing was downloaded: only `make data` downloads
