"""What a served worker holds: no CUDA library where the machine shows no GPU (export/runtime.py)."""

from __future__ import annotations

from pathlib import Path

import httpx

from export.runtime import gpu_evidence, gpu_present

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
