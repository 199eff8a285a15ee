"""Provider choice and sessions, on the machine as it is (no GPU in CI: the fallback is what is tested)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from bundle.manifest import read_bundle
from bundle.runtime import (
    CPU,
    CUDA,
    GpuEvidence,
    RuntimeProviderError,
    active_provider,
    compare,
    gpu_evidence,
    gpu_present,
    open_session,
    requested_providers,
)

REPO = Path(__file__).resolve().parents[2]
A_GPU = GpuEvidence(device_nodes=("/dev/nvidia0",), driver_devices=1, visible_devices=None)
NO_GPU = GpuEvidence(device_nodes=(), driver_devices=None, visible_devices=None)


def test_requested_providers():
    assert requested_providers("auto", A_GPU) == [CUDA, CPU]
    assert requested_providers("auto", NO_GPU) == [CPU]
    assert requested_providers("cuda", NO_GPU) == [CUDA, CPU]  # asked for: tried, and refused if unusable
    assert requested_providers("cpu", A_GPU) == [CPU]
    with pytest.raises(RuntimeProviderError, match="device 'gpu'"):
        requested_providers("gpu")


@pytest.mark.parametrize("evidence, present", [
    (A_GPU, True),
    (GpuEvidence(("/dev/dxg",), 1, None), True),  # WSL2
    (GpuEvidence(("/dev/nvidia0", "/dev/nvidia1"), 2, "1"), True),
    (NO_GPU, False),
    (GpuEvidence((), 1, None), False),  # a driver but no device node: not in this container
    (GpuEvidence(("/dev/nvidia0",), None, None), False),  # a device node but no driver library
    (GpuEvidence(("/dev/nvidia0",), 0, None), False),  # the driver counts no GPU (cuInit failed)
    (GpuEvidence(("/dev/nvidia0",), 1, ""), False),  # CUDA_VISIBLE_DEVICES hides them all
    (GpuEvidence(("/dev/nvidia0",), 1, "-1"), False),
])
def test_gpu_present_needs_a_device_and_a_driver_that_counts_it(evidence, present):
    assert gpu_present(evidence) is present


def test_gpu_evidence_of_this_machine_matches_its_device_nodes():
    evidence = gpu_evidence()
    nodes = [p for p in Path("/dev").glob("nvidia*") if p.name[len("nvidia"):].isdigit()]
    assert len(evidence.device_nodes) == len(nodes) + Path("/dev/dxg").exists()
    if not evidence.device_nodes:
        assert evidence.driver_devices is None  # the driver library is not even loaded without a device


def test_auto_session_maps_cuda_libraries_only_where_a_gpu_is(tiny_bundle):
    """In a fresh process (this one may have loaded CUDA through torch): an "auto" session, then the
    process's memory map. Without a GPU no CUDA library is loaded; with one, the session runs on CUDA."""
    script = ("import sys\nfrom bundle.manifest import read_bundle\nfrom bundle.runtime import gpu_evidence, "
              "gpu_present, open_session\n_, provider = open_session(read_bundle(sys.argv[1]).model_path, 'auto')\n"
              "print(provider, gpu_present(gpu_evidence()))\nprint(open('/proc/self/maps').read())")
    out = subprocess.run([sys.executable, "-c", script, str(tiny_bundle)], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120, check=True).stdout
    provider, present = out.splitlines()[0].split()
    mapped = {line.split()[-1].rsplit("/", 1)[-1] for line in out.splitlines()[1:] if "/" in line}
    cuda_libraries = {name for name in mapped if name.startswith(("libcublas", "libcudnn", "libcufft", "libcurand",
                                                                  "libnvrtc", "libcudart"))}
    if present == "False":
        assert provider == CPU and cuda_libraries == set()
    else:
        assert provider == CUDA and any(name.startswith("libcublas") for name in cuda_libraries)


def test_active_provider_reads_the_session_list():
    assert active_provider([CUDA, CPU]) == CUDA
    assert active_provider([CPU]) == CPU
    assert active_provider(["TensorrtExecutionProvider", CUDA, CPU]) == CUDA
    with pytest.raises(RuntimeProviderError):
        active_provider(["OpenVINOExecutionProvider"])


def test_auto_session_reports_what_it_really_runs_on(tiny_bundle):
    """onnxruntime-gpu lists CUDA as available even where no GPU is; the session's list decides."""
    session, provider = open_session(read_bundle(tiny_bundle).model_path, "auto")
    assert provider == active_provider(session.get_providers())
    if CUDA not in session.get_providers():
        assert provider == CPU
        assert CUDA in ort.get_available_providers()  # the list that must not be trusted


def test_cuda_demanded_without_a_usable_gpu_is_an_error(tiny_bundle):
    path = read_bundle(tiny_bundle).model_path
    session, provider = open_session(path, "auto")
    if provider == CUDA:
        pytest.skip("a usable GPU is present")
    with pytest.raises(RuntimeProviderError, match="runs on CPUExecutionProvider"):
        open_session(path, "cuda")


def test_cpu_session_never_asks_for_cuda(tiny_bundle):
    session, provider = open_session(read_bundle(tiny_bundle).model_path, "cpu")
    assert session.get_providers() == [CPU] and provider == CPU


def test_compare_limits():
    import numpy as np

    from bundle.manifest import Tolerance

    a, tol = np.array([0.0, 100.0], dtype=np.float32), Tolerance(atol=1e-5, rtol=1e-4)
    assert compare("x", a, a + np.array([5e-6, 5e-3], dtype=np.float32), tol) is None
    assert "differs" in compare("x", a, a + np.array([5e-5, 0], dtype=np.float32), tol)
    assert "shape" in compare("x", a, a[:1], tol)
    assert "differs" in compare("x", a, a + np.array([1e-30, 0], dtype=np.float32), Tolerance(atol=0, rtol=0))


def test_probe_limits_per_output_with_the_older_bundles_fallback():
    from bundle.manifest import ProbeSpec, Tolerance
    from bundle.parity import DISTANCE
    from bundle.runtime import probe_limit

    common = Tolerance(atol=1e-5, rtol=1e-4)
    older = ProbeSpec(images=10, atol=1e-5, rtol=1e-4)  # a manifest without per-output limits
    assert probe_limit(older, "distances") == common
    newer = ProbeSpec(images=10, atol=1e-5, rtol=1e-4, limits={"distances": DISTANCE})
    assert probe_limit(newer, "distances") == DISTANCE and probe_limit(newer, "logits") == common
