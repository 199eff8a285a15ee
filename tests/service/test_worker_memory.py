"""What a served worker holds: no CUDA library where the machine shows no GPU (bundle/runtime.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from bundle.runtime import gpu_evidence, gpu_present

CUDA_LIBRARIES = ("libcublas", "libcublasLt", "libcudnn", "libcufft", "libcurand", "libnvrtc", "libcudart")


def test_a_worker_without_a_gpu_maps_no_cuda_library(server, tiny_bundle):
    """Both workers (told apart by x-protoserve-worker, their pid) serve on CPU with no CUDA library mapped."""
    pids = set()
    for _ in range(40):
        r = httpx.post(f"{server}/predict", json={"images": [[[0.0] * 28] * 28]}, timeout=30)
        assert r.status_code == 200
        pids.add(int(r.headers["x-protoserve-worker"]))
        if len(pids) == 2:
            break
    assert httpx.post(f"{server}/metadata", json={}, timeout=30).json()["provider"] == (
        "CUDAExecutionProvider" if gpu_present(gpu_evidence()) else "CPUExecutionProvider")
    for pid in pids:
        mapped = {line.split()[-1].rsplit("/", 1)[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                  if "/" in line}
        cuda = sorted(name for name in mapped if name.startswith(CUDA_LIBRARIES))
        if not gpu_present(gpu_evidence()):
            assert cuda == [], f"worker {pid} maps {cuda}"


def test_without_a_registry_a_worker_imports_no_review_api(tiny_bundle):
    """The review API (FastAPI, its models) is imported only where a registry is served."""
    code = "import sys, service.api; print(sorted({'fastapi', 'service.review'} & set(sys.modules)))"
    env = {k: v for k, v in os.environ.items() if k != "PROTOSERVE_REGISTRY"}
    env.update(PROTOSERVE_BUNDLE=str(tiny_bundle), PYTHONPATH=str(Path(__file__).resolve().parents[2]),
               BENTOML_DO_NOT_TRACK="True")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
