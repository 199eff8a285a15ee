"""Running a bundle's graphs with ONNX Runtime: provider choice, session options, the golden probe.

No torch import: the service and `protoserve verify` use this module as they are.

Public API:
    CUDA, CPU                                   provider names
    GpuEvidence, gpu_evidence(), gpu_present()  whether this machine shows a usable NVIDIA GPU
    requested_providers(device) -> list[str]    what to ask a session for: "auto" | "cuda" | "cpu"
    active_provider(session_providers) -> str   what the session really runs on (from get_providers())
    session_options(threads, optimization)      the SessionOptions chosen by benchmarks/inference_speed.py
    open_session(path, device, ...) -> (InferenceSession, provider)
    run_probe(bundle, device) -> ProbeResult    the golden probe through model.onnx (and decoder.onnx)
    verify_bundle(bundle, device) -> (Bundle, ProbeResult)   read_bundle + probe; BundleError on a miss
    classify(session, images, features=None) -> (probabilities, distances[, features])   the call every
                                                caller of model.onnx makes
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bundle.manifest import Bundle, BundleError, ProbeSpec, Tolerance, read_bundle
from bundle.parity import limit_used
from protoserve.errors import ProtoserveError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cuda", "cpu")

# Full graph optimisation and one intra-op thread per session: sessions with more threads stall
# each other when the other cores are busy, and one thread leaves cores to the other workers
# (benchmarks/inference_speed.py chose these; README "Results").
DEFAULT_THREADS = 1
DEFAULT_OPTIMIZATION = "all"


class RuntimeProviderError(ProtoserveError):
    pass


@dataclass(frozen=True)
class GpuEvidence:
    """What a process can check cheaply, before loading any CUDA library, about NVIDIA GPUs here."""

    device_nodes: tuple[str, ...]  # /dev/nvidia0, /dev/nvidia1, ... (Linux) or /dev/dxg (WSL2)
    driver_devices: int | None  # GPUs the driver (libcuda.so.1) counts; None: no driver library
    visible_devices: str | None  # CUDA_VISIBLE_DEVICES as set, None when unset


def gpu_present(evidence: GpuEvidence) -> bool:
    """Whether a CUDA session is worth asking for: a device node, a driver that counts a GPU, and
    CUDA_VISIBLE_DEVICES not hiding them all. The session's get_providers() still has the last word."""
    if evidence.visible_devices is not None and evidence.visible_devices.strip() in ("", "-1", "none"):
        return False
    return bool(evidence.device_nodes) and bool(evidence.driver_devices)


@functools.cache
def gpu_evidence() -> GpuEvidence:
    """This machine's evidence; the driver is only asked where a device node exists."""
    nodes = tuple(sorted(p for p in glob.glob("/dev/nvidia*") if p[len("/dev/nvidia"):].isdigit()))
    nodes += tuple(p for p in ("/dev/dxg",) if os.path.exists(p))
    return GpuEvidence(nodes, _driver_device_count() if nodes else None, os.environ.get("CUDA_VISIBLE_DEVICES"))


def _driver_device_count() -> int | None:
    """GPUs the NVIDIA driver reports (cuInit + cuDeviceGetCount), None without the driver library."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def requested_providers(device: str, evidence: GpuEvidence | None = None) -> list[str]:
    """Providers to ask a session for, best first; CPU is always the fallback.

    "auto" asks for CUDA only where `gpu_present` (evidence defaults to this machine's): asking
    for it, and preloading the CUDA libraries it needs, maps ~200 MB of libraries and ~100 MB of
    their memory into every process, for nothing where no GPU can run them. "cuda" always asks."""
    if device not in DEVICES:
        raise RuntimeProviderError(f"device {device!r}: expected one of {', '.join(DEVICES)}")
    if device == "cpu":
        return [CPU]
    if device == "auto" and not gpu_present(gpu_evidence() if evidence is None else evidence):
        return [CPU]
    return [CUDA, CPU]


def active_provider(session_providers: list[str]) -> str:
    """The provider a created session runs on: CUDA only if the session itself kept it.

    Decide from `session.get_providers()`, never from `onnxruntime.get_available_providers()`:
    onnxruntime-gpu lists CUDA as available on a machine without a GPU or driver, and a session
    asked for CUDA there silently falls back to CPU.
    """
    if CUDA in session_providers:
        return CUDA
    if CPU in session_providers:
        return CPU
    raise RuntimeProviderError(f"session runs on none of {CUDA}, {CPU} (got {session_providers})")


def session_options(threads: int = DEFAULT_THREADS, optimization: str = DEFAULT_OPTIMIZATION):
    """SessionOptions with `threads` intra-op threads and an optimisation level by name."""
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization not in levels:
        raise RuntimeProviderError(f"optimization {optimization!r}: expected one of {', '.join(levels)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # the graphs are a single chain; parallel branches buy nothing
    return options


def open_session(path: str | Path | bytes, device: str = "auto", threads: int = DEFAULT_THREADS,
                 optimization: str = DEFAULT_OPTIMIZATION):
    """An InferenceSession on the best usable provider (`path`: a model file, or a serialized model);
    returns (session, provider it runs on)."""
    import onnxruntime as ort

    providers = requested_providers(device)
    if CUDA in providers:
        _preload_cuda_libraries(ort)
    if device == "auto":
        # "auto" falling back to CPU (a GPU without the CUDA 13 / cuDNN 9 libraries) is a normal
        # outcome; ONNX Runtime's error log about it is noise. The outcome is read from get_providers().
        ort.set_default_logger_severity(4)
    try:
        model = path if isinstance(path, bytes) else str(path)
        session = ort.InferenceSession(model, sess_options=session_options(threads, optimization),
                                       providers=providers)
    except Exception as e:  # ORT raises its own exception types for a bad file; all mean "not loadable"
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise BundleError(f"{path}: ONNX Runtime cannot load it ({first})") from None
    finally:
        ort.set_default_logger_severity(2)
    provider = active_provider(session.get_providers())
    if device == "cuda" and provider != CUDA:
        raise RuntimeProviderError(f"{path}: device 'cuda' asked for, but the session runs on {provider} "
                                   f"(no usable GPU, driver, CUDA 13 or cuDNN 9; {gpu_evidence()})")
    return session, provider


def _preload_cuda_libraries(ort) -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels (the [cuda,cudnn] extras) before creating a session."""
    try:
        ort.preload_dlls()
    except Exception:  # missing libraries only mean CUDA won't be usable; get_providers() tells
        pass


@dataclass
class ProbeResult:
    images: int
    provider: str
    max_abs_diff: dict[str, float]  # output name -> largest |onnx - expected|
    failures: list[str]  # "<output>: <problem>", empty when the probe passed

    @property
    def passed(self) -> bool:
        return not self.failures


def load_probe(bundle: Bundle) -> dict[str, np.ndarray]:
    """The probe arrays: "input.<name>" and "output.<name>" (decoder: "decoder.<name>")."""
    try:
        with np.load(bundle.probe_path, allow_pickle=False) as probe:
            return {k: probe[k] for k in probe.files}
    except Exception as e:  # zipfile/numpy raise many types for a damaged file
        raise BundleError(f"{bundle.probe_path}: not a readable probe ({e})") from None


def compare(name: str, actual: np.ndarray, expected: np.ndarray, tol: Tolerance) -> str | None:
    """None if actual matches expected within |a - e| <= atol + rtol * |e| (bundle/parity.py), else the problem."""
    if actual.shape != expected.shape:
        return f"{name}: shape {actual.shape}, expected {expected.shape}"
    used = limit_used(actual, expected, tol)
    if not used <= 1.0:
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max()
        return (f"{name}: differs from the stored output by up to {diff:.3g} "
                f"({used:.3g} times the limit {tol.atol:.3g} + {tol.rtol:g}*|x|)")
    return None


def probe_limit(spec: ProbeSpec, name: str) -> Tolerance:
    """The output's own limit where the manifest names one, else the probe's atol and rtol."""
    return (spec.limits or {}).get(name) or Tolerance(atol=spec.atol, rtol=spec.rtol)


def run_probe(bundle: Bundle, device: str = "cpu") -> ProbeResult:
    """Run the golden probe's inputs through the bundle's graphs and compare with its outputs."""
    probe = load_probe(bundle)
    spec = bundle.manifest.probe
    session, provider = open_session(bundle.model_path, device)
    feeds = {t.name: probe.get(f"input.{t.name}") for t in bundle.manifest.model.inputs}
    if any(v is None for v in feeds.values()):
        raise BundleError(f"{bundle.probe_path}: lacks inputs {[k for k, v in feeds.items() if v is None]}")
    names = bundle.output_names
    actual = dict(zip(names, session.run(names, feeds), strict=True))
    expected = {n: probe.get(f"output.{n}") for n in names}
    if bundle.manifest.decoder is not None:
        decoder, _ = open_session(bundle.decoder_path, device)
        d_in = [t.name for t in bundle.manifest.decoder.inputs]
        d_out = [t.name for t in bundle.manifest.decoder.outputs]
        d_feeds = {n: probe.get(f"decoder.input.{n}") for n in d_in}
        if any(v is None for v in d_feeds.values()):
            raise BundleError(f"{bundle.probe_path}: lacks decoder inputs")
        for n, value in zip(d_out, decoder.run(d_out, d_feeds), strict=True):
            actual[f"decoder.{n}"] = value
            expected[f"decoder.{n}"] = probe.get(f"decoder.output.{n}")
    failures, diffs = [], {}
    for name, value in actual.items():
        if expected[name] is None:
            failures.append(f"{name}: no expected output stored in the probe")
            continue
        problem = compare(name, value, expected[name], probe_limit(spec, name))
        if problem:
            failures.append(problem)
        if value.shape == expected[name].shape:
            diffs[name] = float(np.abs(value.astype(np.float64) - expected[name]).max(initial=0.0))
    return ProbeResult(images=spec.images, provider=provider, max_abs_diff=diffs, failures=failures)


def verify_bundle(bundle: str | Path | Bundle, device: str = "cpu") -> tuple[Bundle, ProbeResult]:
    """Schema, checksums and the golden probe; BundleError naming the file and problem on a miss.

    Given a Bundle already read (its checksums checked), only the probe runs."""
    if not isinstance(bundle, Bundle):
        bundle = read_bundle(bundle)
    result = run_probe(bundle, device)
    if not result.passed:
        raise BundleError(f"{bundle.model_path}: golden probe failed: {result.failures[0]}")
    return bundle, result


def classify(session, images: np.ndarray, features: str | None = None) -> tuple[np.ndarray, ...]:
    """model.onnx on [N, C, H, W] model input -> probabilities [N, K], distances [N, M], and the output
    named `features` [N, D] as a third value when one is named (the out-of-domain rule's `outputs`)."""
    return tuple(session.run(["probabilities", "distances", features] if features else ["probabilities", "distances"],
                             {"image": images}))
