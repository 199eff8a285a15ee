"""A failed job's reason: each kind of failure the project knows maps to one sentence a reviewer can act on."""

from __future__ import annotations

import pytest
import torch

from bundle.manifest import BundleError
from export.build import ExportError, ParityError
from registry.job_failures import FAILURES, failure_reason
from registry.store import RegistryError
from registry.verdicts import VerdictError
from revision.revise import ParentError, TrainSubsetError, failure_details, failure_kind
from training.checkpoint import CheckpointError
from training.datasets import DatasetError
from training.splits import DataError


@pytest.mark.parametrize(("error", "kind"), [
    (ParityError("model.onnx: parity with PyTorch fails"), "parity"),
    (BundleError("model.onnx: golden probe failed"), "verification"),
    (CheckpointError("checkpoint.pt: checkpoint not found"), "checkpoint"),
    (ParentError("version '0.1.0' is not registered"), "parent"),
    (VerdictError("job 1: prototype id(s) [99] do not exist"), "verdicts"),
    (DataError("MNIST is missing"), "data"),
    (DatasetError("no such data set"), "data"),
    (MemoryError(), "memory"),
    (torch.OutOfMemoryError("CUDA out of memory"), "memory"),
    (ExportError("an export problem that is not parity"), "other"),
    (RegistryError("version '0.1.0-r1' is registered already"), "other"),
    (ValueError("a bug"), "other"),
])
def test_failures_map_to_their_kind(error, kind):
    assert failure_kind(error) == kind
    assert failure_reason(kind) == FAILURES[kind]


def test_a_missing_class_names_the_subset_and_the_class():
    error = TrainSubsetError(50, [7])
    assert failure_reason(failure_kind(error), **failure_details(error)) == (
        "The training subset of 50 images has no example of class 7, which the model's prototypes stand for; "
        "use a larger train_subset.")


def test_every_reason_is_one_sentence_saying_what_to_do():
    for kind, sentence in FAILURES.items():
        assert sentence[0].isupper() and sentence.endswith(".") and sentence.count(". ") == 0, kind
        assert ";" in sentence, kind  # what failed; what to change
    assert failure_reason("no such kind") == FAILURES["other"]
