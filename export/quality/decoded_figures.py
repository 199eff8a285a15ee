"""The quality report's figure for a model with a decoder (PrototypeDL): whether each decoded
prototype is put in its own class by an independent model (another bundle, through ONNX Runtime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bundle.manifest import BundleError, InputSpec, read_bundle
from bundle.runtime import open_session
from export.quality import probes
from export.quality.run import DEFAULT_JUDGE, Run


def _decoded_own_class(run: Run, split) -> None:
    decoded = probes.decoded_prototypes(run.model)  # [m, C, H, W] in this model's input space
    if decoded is None:
        run.not_applicable["decoded_prototypes_own_class"] = "the model has no decoder to show its prototypes"
        return
    judge_path = run.options.judge or DEFAULT_JUDGE
    problem = _judge_problem(run, Path(judge_path))
    if problem:
        run.not_applicable["decoded_prototypes_own_class"] = problem
        return
    judge = read_bundle(judge_path)
    x = _convert(decoded, run.bundle.manifest.input, judge.manifest.input)
    session, _ = open_session(judge.model_path, device="cpu")
    probabilities = session.run(["probabilities"], {"image": x})[0]
    identities = np.array(run.identities)
    labels = probabilities.argmax(axis=1)
    run.each("judge_label", [int(v) for v in labels])
    run.each("judge_own_class_probability", [round(float(p[c]), 4) for p, c in zip(probabilities, identities,
                                                                                     strict=True)])
    run.summary("decoded_prototypes_own_class", list((labels == identities).astype(float)), "chance (1 / classes)",
                1.0 / len(run.bundle.manifest.class_names), judge=judge.manifest.tag)
    run.figures["decoded_prototypes_own_class"].detail["misclassified"] = [
        {"id": row.id, "judge_label": int(label)} for row, label, ok in
        zip(run.bundle.manifest.prototypes, labels, labels == identities, strict=True) if not ok]


def _judge_problem(run: Run, path: Path) -> str | None:
    """Why `path` cannot judge this bundle's decoded prototypes (None when it can)."""
    try:
        judge = read_bundle(path)
    except BundleError as e:
        return f"no independent model to judge the decoded prototypes ({e})"
    m, j = run.bundle.manifest, judge.manifest
    if j.name == m.name:
        return f"{j.tag} is this model, not an independent one"
    if j.class_names != m.class_names or (j.input.channels, j.input.height, j.input.width) != (
            m.input.channels, m.input.height, m.input.width):
        return f"{j.tag} takes other classes or another input shape"
    return None


def _convert(x: np.ndarray, source: InputSpec, target: InputSpec) -> np.ndarray:
    """Model input of one input spec -> the same pixels as another spec's model input."""
    pixels = x * np.array(source.std).reshape(1, -1, 1, 1) + np.array(source.mean).reshape(1, -1, 1, 1)
    return ((pixels - np.array(target.mean).reshape(1, -1, 1, 1)) / np.array(target.std).reshape(1, -1, 1, 1)
            ).astype(np.float32)


DECODED_STAGES = [_decoded_own_class]
