"""Checkpoints: state dicts plus config in one file, never pickled modules.

A checkpoint is a dict of tensors and plain values saved with torch.save and read back with
weights_only=True, so loading never runs code from the file. Loading rebuilds the model from the
stored config and refuses a file whose family, keys or shapes don't match it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from protoserve.errors import ProtoserveError
from training.config import Config, ConfigError
from training.families import family

FORMAT = "protoserve-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ProtoserveError):
    pass


def build_model(config: Config, initial_weights: bool = True) -> nn.Module:
    """The model of config.model.family; initial_weights=False skips pretrained backbone weights
    (a checkpoint's state dict replaces them anyway, and loading must never download)."""
    return family(config.model.family).build(config.model, initial_weights)


def save_checkpoint(path: Path, model, config: Config, epoch: int, metrics: dict,
                    training_state: dict | None = None, revision: dict | None = None) -> None:
    """Write atomically (temp file + rename), so an interruption never leaves half a checkpoint.
    `revision` (revision/rounds.py) records masked prototype ids, antitypes, verdicts and lineage."""
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": config.model.family,
        "config": config.to_dict(),
        "epoch": epoch,
        "metrics": metrics,
        "model": model.state_dict(),
        "training_state": training_state,
    }
    if revision is not None:
        payload["revision"] = revision
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's payload (weights_only), or CheckpointError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; all mean "not loadable"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a protoserve checkpoint (no '{FORMAT}' header)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {payload.get('format_version')}, "
                              f"this protoserve reads {FORMAT_VERSION}")
    return payload


def load_checkpoint(path: Path, expect_config: Config | None = None) -> tuple[nn.Module, Config, dict]:
    """Rebuild the model from a checkpoint; returns (model in eval mode, config, payload)."""
    payload = read_checkpoint(path)
    try:
        config = Config.from_dict(payload["config"], source=f"{path}: stored config")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if payload.get("family") != config.model.family:
        raise CheckpointError(f"{path}: family {payload.get('family')!r} does not match its config "
                              f"({config.model.family!r})")
    if expect_config is not None and expect_config.model != config.model:
        raise CheckpointError(f"{path}: model config differs from the run's config "
                              f"(stored {config.model}, expected {expect_config.model})")
    model = build_model(config, initial_weights=False)
    check_state_dict(model.state_dict(), payload["model"], str(path))
    model.load_state_dict(payload["model"])
    model.eval()
    return model, config, payload


def check_state_dict(expected: dict, found: dict, where: str) -> None:
    """CheckpointError unless `found` has exactly the keys and shapes of `expected`."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{where}: state dict does not match the model (missing {missing[:3]}, "
                              f"unexpected {extra[:3]})")
    for key, tensor in expected.items():
        if tuple(found[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{where}: {key} has shape {tuple(found[key].shape)}, "
                                  f"the config needs {tuple(tensor.shape)}")
