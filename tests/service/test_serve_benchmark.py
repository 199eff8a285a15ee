"""benchmarks/serve.py runs end to end on the tiny model and reports every figure the README needs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_serve_benchmark_reports_all_systems_and_levels(tiny_checkpoint, tiny_bundle, tmp_path):
    out = tmp_path / "serve.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "serve.py"), "--bundle", str(tiny_bundle),
                             "--checkpoint", str(tiny_checkpoint), "--out", str(out), "--scale", "0.05",
                             "--rounds", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["raw"]["batch_1"]["p50_ms"] > 0 and figures["raw"]["batch_64_images_per_s"] > 0
    for system in ("protoserve_predict", "protoserve_explain", "floor_predict", "naive_predict"):
        rows = figures[system]
        assert [r["clients"] for r in rows] == [1, 8, 64]
        for r in rows:
            assert r["errors"] == 0 and r["requests"] >= 20 and len(r["rounds"]) == 2
            assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] and r["requests_per_s"] > 0
    assert set(figures["floor_ratios"]) == {"c1", "c8", "c64"}
    assert all(r["throughput"] > 0 and r["p50"] > 0 and "server_cpu" in r for r in figures["floor_ratios"].values())
    assert all(r["server_cpu_us"] >= 0 for system in ("protoserve_predict", "floor_predict") for r in figures[system])
    memory = figures["worker_memory_mb"]
    assert len(memory["protoserve"]) == len(memory["floor"]) == 2 and min(memory["floor"]) > 10
    assert set(figures["targets"]) == {"predict_c1_p50_minus_floor_minus_raw_ms", "predict_c1_p50_vs_floor_plus_raw",
                                       "predict_c64_throughput_vs_floor", "predict_c64_throughput_vs_naive",
                                       "explain_c1_p50_minus_predict_ms", "worker_memory_vs_floor"}
    assert figures["targets"]["predict_c1_p50_vs_floor_plus_raw"] > 0
    assert "targets:" in result.stdout
