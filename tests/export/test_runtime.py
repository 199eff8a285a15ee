"""Provider choice and sessions, on the machine as it is (no GPU in CI: the fallback is what is tested)."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from export.bundle import read_bundle
from export.runtime import (
    CPU,
    CUDA,
    RuntimeProviderError,
    active_provider,
    compare,
    open_session,
    requested_providers,
)


def test_requested_providers():
    assert requested_providers("auto") == [CUDA, CPU]
    assert requested_providers("cuda") == [CUDA, CPU]
    assert requested_providers("cpu") == [CPU]
    with pytest.raises(RuntimeProviderError, match="device 'gpu'"):
        requested_providers("gpu")


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

    a = np.array([0.0, 100.0], dtype=np.float32)
    assert compare("x", a, a + np.array([5e-6, 5e-3], dtype=np.float32), atol=1e-5, rtol=1e-4) is None
    assert "differs" in compare("x", a, a + np.array([5e-5, 0], dtype=np.float32), atol=1e-5, rtol=1e-4)
    assert "shape" in compare("x", a, a[:1], atol=1e-5, rtol=1e-4)
