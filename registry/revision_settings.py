"""The settings of a revision: one typed object for every surface that takes them.

The review API's request body, `protoserve revise`'s flags, the registry's stored job, the worker
and the revision rounds (revision/rounds.py) all use RevisionSettings; its defaults are written
here once. Torch-free, so the serving side (service/, registry/) can validate and store it. A
stored job is serialised with `model_dump_json` and parsed back with `model_validate_json`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from protoserve.errors import ProtoserveError

# Step sizes and eps must be positive. gt=0 writes an exclusiveMinimum that BentoML's OpenAPI 3.0
# document cannot carry; a smallest value (ge) says the same in both schema dialects.
SMALLEST_POSITIVE = 1e-12
REFINE_EPSILON = 1e-4  # the same eps as ProtoPNet's similarity, so Refine of a coinciding pair is 1
BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
          "less_than": ("<", "lt")}


class RevisionSettingsError(ProtoserveError):
    """Settings that do not validate, said in one line: "rounds must be >= 1"."""


class RevisionSettings(BaseModel):
    """How to revise a model from verdicts on its prototypes (the paper's Alg. 1, or masking, or pruning)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)  # no false for 0, no "1" for 1

    mode: Literal["mask", "prune", "revise"] = Field(
        "revise", description="mask the rejected prototypes, prune automatically, or revise them (Alg. 1)")
    rounds: int = Field(5, ge=1, le=100, description="revision rounds N (mode revise; mask and prune run one)")
    epochs_per_round: int = Field(2, ge=0, le=100, description="training epochs M in each round (mode revise)")
    freeze_encoder: bool = Field(True, description="train the prototypes only, not the encoder")
    all_rounds: bool = Field(False, description="train every round, also after one that rejects nothing")
    train_subset: int | None = Field(None, description="revise on the first N training images only",
                                     json_schema_extra={"minimum": 1})
    lambda_refine: float = Field(1.0, ge=0.0, description="weight of Refine, the antitypes' repulsion (lambda_3)")
    lambda_con: float = Field(1.0, ge=0.0, description="weight of Con, the latent hypercube constraint (lambda_4)")
    refine_epsilon: float = Field(REFINE_EPSILON, ge=SMALLEST_POSITIVE,
                                  description="eps of Refine's log ratio")
    lr_prototypes: float = Field(3e-2, ge=SMALLEST_POSITIVE, description="Adam step size of the prototypes "
                                 "(one epoch can move a prototype clear of its antitype)")
    lr_encoder: float = Field(1e-3, ge=SMALLEST_POSITIVE,
                              description="Adam step size of the encoder, when it is trained")
    last_layer_epochs: int = Field(5, ge=0, description="epochs of the last layer's re-fit after each round")
    lr_last_layer: float = Field(3e-3, ge=SMALLEST_POSITIVE,
                                 description="step size of the last layer's re-fit")
    batch_size: int = Field(100, ge=1, description="training batch size")
    eval_batch_size: int = Field(1000, ge=1, description="batch size of evaluation and push")
    seed: int = Field(0, description="seed of the shuffles and of torch")
    auto_promote: bool = Field(False, description="a job: promote the candidate if it passes the gates: verified, "
                               "parity, accuracy at most max_accuracy_drop below its parent")
    max_accuracy_drop: float = Field(0.01, ge=0.0, le=1.0, description="a job: the automatic promotion's largest "
                                     "allowed drop of test accuracy")

    @field_validator("train_subset")
    @classmethod
    def _at_least_one_image(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"train subset {value}: must be at least 1 training image")
        return value

    @property
    def rounds_run(self) -> int:
        """Rounds the mode runs: mask and prune run one."""
        return self.rounds if self.mode == "revise" else 1

    def settings(self) -> RevisionSettings:
        """The revision settings alone (a request body or a stored job adds fields of its own)."""
        return RevisionSettings(**self.model_dump(include=set(RevisionSettings.model_fields)))

    @classmethod
    def of(cls, **values) -> RevisionSettings:
        """Validated settings, or RevisionSettingsError with one readable line (the CLI's and benchmarks' way in)."""
        try:
            return cls(**values)
        except ValidationError as e:
            raise RevisionSettingsError(one_line(e)) from None


class QueuedRevision(RevisionSettings):
    """A revision job as the registry stores it: its settings and the verdicts it revises with."""

    verdict_ids: list[int] = Field(default_factory=list, description="the registry's ids of the job's verdicts")


def one_line(error: ValidationError) -> str:
    """A validation error as one line: "rounds must be >= 1; mode must be one of ..."."""
    return "; ".join(_problem(e) for e in error.errors())


def _problem(e: dict) -> str:
    field = ".".join(str(part) for part in e["loc"]) or "settings"
    if e["type"] in BOUNDS:
        op, key = BOUNDS[e["type"]]
        return f"{field} must be {op} {e['ctx'][key]}"
    if e["type"] == "value_error":
        return str(e["ctx"]["error"])
    if e["type"] == "literal_error":
        return f"{field} must be one of {e['ctx']['expected']}, got {e['input']!r}"
    return f"{field}: {e['msg']}"
