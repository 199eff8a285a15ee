"""benchmarks/inference_speed.py runs end to end and reports what the README table needs (short timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_benchmark_reports_every_batch_size(tiny_checkpoint, tiny_bundle, tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "inference_speed.py"), "--checkpoint",
                             str(tiny_checkpoint), "--bundle", str(tiny_bundle), "--seconds", "0.01",
                             "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())
    assert [r["batch"] for r in figures["table"]] == [1, 16, 64, 256]
    for r in figures["table"]:
        assert r["onnxruntime_images_per_second"] > 0 and r["pytorch_images_per_second"] > 0
        assert abs(r["ratio"] - r["onnxruntime_images_per_second"] / r["pytorch_images_per_second"]) < 1e-9
    assert len(figures["sweep"]) == 4 * 1 * 4  # optimisation levels x thread counts x batch sizes
    assert figures["chosen"]["optimization"] in ("disable", "basic", "extended", "all")
    assert "| batch | PyTorch eager (images/s) | ONNX Runtime CPU (images/s) | ratio ORT/PyTorch |" in result.stdout
