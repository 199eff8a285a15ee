"""The batch scoring core: inputs -> one output row each, shared by `protoserve score` (local and Ray
engines) and the service's `/score_batch` task. No torch, no pyarrow: numpy in, plain columns out.

Inputs are converted exactly as the service converts them (inference/preprocess.py): picture bytes are
decoded to the manifest's mode and size, arrays must have its shape and range, uint8 arrays are
grey levels (0-255) as the IDX files store them. A bad input does not stop the batch: its row
carries the reason in `error` and empty prediction fields.

Row fields (`ROW_FIELDS`, one row per input, in input order):
    index                the input's ordinal in the job (0, 1, 2, ...)
    input_id             stable id: a file path (the folder as given + the path inside it), or
                         "<file>#<record>" in an IDX/.npy/Parquet file, "<file>:<array>#<record>"
                         in an .npz; "images[<i>]" in the HTTP task
    label, class_name    the predicted class (null when the row abstained)
    probabilities        K floats
    prototype_ids        the top_k nearest active prototypes, nearest first (ids from the manifest)
    prototype_distances  their squared L2 distances
    prototype_similarities  log((d + 1) / (d + 1e-4)) of each distance (protoserve/similarity.py;
                         /explain's "similarity")
    prototype_contributions what each adds to the predicted class's logit (/explain's "contribution";
                         the family's rule, bundle/families.py)
    in_domain            whether the input is like the model's validation images (inference/domain.py);
                         null when the bundle has no out-of-domain calibration
    typicality           the share of validation images that scored further from the prototypes (0-1)
    abstained            true when the row withholds its label: asked to abstain (`--abstain`, the
                         /score_batch option "abstain") and out of domain; label and class_name are
                         then null, the probabilities and nearest prototypes stay (as /explain's answer)
    true_label           the input's class where the input says it (an IDX labels file beside an IDX
                         images file, a folder's class sub-folder named as a class), else null
    picture              the explanation picture written for the row (`--pictures`), else null
    model_name, model_version
    error                null when scored; else "<reason>: <message>"
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bundle.families import family
from bundle.manifest import InputSpec, Manifest
from inference.domain import domain_rule
from inference.explain import active_mask, nearest_prototypes_batch, similarity
from inference.preprocess import (
    DEFAULT_LIMITS,
    Limits,
    array_to_input,
    canonical_input,
    check_canonical,
    normalize,
    to_input,
)
from protoserve.errors import InputError

ROW_FIELDS = ("index", "input_id", "label", "class_name", "probabilities", "prototype_ids",
              "prototype_distances", "prototype_similarities", "prototype_contributions", "in_domain",
              "typicality", "abstained", "true_label", "picture", "model_name", "model_version", "error")
# Images per session.run: enough to keep a session busy; smaller slices keep the job's memory per
# worker small and leave the service's batcher room.
RUN_BATCH = 256

# [N, C, H, W] model input -> (probabilities [N, K], distances [N, M])
# model input -> (probabilities, distances[, features]): bundle.runtime.classify with the scorer's `features`
Infer = Callable[[np.ndarray], tuple[np.ndarray, ...]]


@dataclass
class Columns:
    """Rows of one batch, column by column (ROW_FIELDS). Prediction columns hold the scored rows only
    (where `ok`, in order); the other rows have nulls there and their reason in `error`."""

    index: np.ndarray  # int64 [n]
    input_id: Sequence[str]  # a list, or scoring.inputs.RecordIds (built as an Arrow column when written)
    ok: np.ndarray  # bool [n]
    label: np.ndarray  # int64 [n_ok]
    probabilities: np.ndarray  # float32 [n_ok, K]
    prototype_ids: np.ndarray  # int32 [n_ok, top_k]
    prototype_distances: np.ndarray  # float32 [n_ok, top_k]
    prototype_similarities: np.ndarray  # float32 [n_ok, top_k]
    prototype_contributions: np.ndarray  # float32 [n_ok, top_k]
    class_names: list[str]
    model_name: str
    model_version: str
    error: list[str | None]
    in_domain: np.ndarray | None = None  # bool [n_ok]; None without calibration
    typicality: np.ndarray | None = None  # float32 [n_ok]
    abstained: np.ndarray | None = None  # bool [n_ok]: the label is withheld; None: no row abstains
    true_label: np.ndarray | None = None  # int64 [n], -1 where the input does not say; None: none says
    picture: list[str | None] | None = None  # [n] the explanation picture written for each row

    def __len__(self) -> int:
        return len(self.input_id)

    @property
    def failed(self) -> int:
        return int(len(self) - self.ok.sum())

    @property
    def out_of_domain(self) -> int:
        return 0 if self.in_domain is None else int(len(self.in_domain) - self.in_domain.sum())

    def withheld(self, abstain: bool = False) -> np.ndarray:
        """bool [n_ok]: rows whose label is withheld (self.abstained, or out of domain when `abstain`)."""
        withheld = np.zeros(len(self.label), bool) if self.abstained is None else self.abstained
        if abstain and self.in_domain is not None:
            withheld = withheld | ~self.in_domain
        return withheld

    def records(self, abstain: bool = False) -> list[dict]:
        """The rows as JSON-ready dicts (the HTTP task's answer; JSON Lines lines hold the same);
        `abstain` withholds the label of out-of-domain rows."""
        rows, j = [], 0
        withheld = self.withheld(abstain)
        for i in range(len(self)):
            truth = None if self.true_label is None or self.true_label[i] < 0 else int(self.true_label[i])
            row = {"index": int(self.index[i]), "input_id": self.input_id[i], "label": None, "class_name": None,
                   "probabilities": None, "prototype_ids": None, "prototype_distances": None,
                   "prototype_similarities": None, "prototype_contributions": None, "in_domain": None,
                   "typicality": None, "abstained": None, "true_label": truth,
                   "picture": None if self.picture is None else self.picture[i],
                   "model_name": self.model_name, "model_version": self.model_version, "error": self.error[i]}
            if self.ok[i]:
                label = int(self.label[j])
                row.update(label=label, class_name=self.class_names[label],
                           probabilities=[float(v) for v in self.probabilities[j]],
                           prototype_ids=[int(v) for v in self.prototype_ids[j]],
                           prototype_distances=[float(v) for v in self.prototype_distances[j]],
                           prototype_similarities=[float(v) for v in self.prototype_similarities[j]],
                           prototype_contributions=[float(v) for v in self.prototype_contributions[j]])
                if self.in_domain is not None:
                    row.update(in_domain=bool(self.in_domain[j]), typicality=float(self.typicality[j]))
                row["abstained"] = bool(withheld[j])
                if withheld[j]:
                    row.update(label=None, class_name=None)
                j += 1
            rows.append(row)
        return rows




def records_to_input(records: np.ndarray, spec: InputSpec,
                     out: np.ndarray | None = None) -> tuple[np.ndarray, list[InputError | None]]:
    """A stack of array records [n, H, W] or [n, C, H, W] -> (model input [n, C, H, W], errors).

    uint8 records are grey levels 0-255 (scaled like a decoded picture); other numbers must already
    be in the value range. Rows that fail get the service's own InputError (from array_to_input) and
    zeros in the returned input.
    """
    n = len(records)
    expected = (spec.channels, spec.height, spec.width)
    if records.ndim == 3 and spec.channels == 1:
        records = records[:, None]
    if records.shape[1:] != expected or records.dtype.kind not in "iuf":
        # Every row has the same problem; array_to_input words it as the service does.
        error = _array_error(records[0] if n else records, spec)
        return np.zeros((n, *expected), np.float32), [error] * n
    low, high = spec.value_range
    if records.dtype == np.uint8:
        return grey_levels_to_input(records, spec, out), [None] * n
    values = records.astype(np.float64)
    flat = values.reshape(n, -1)
    tolerance = 1e-6 * (high - low)
    bad = ~np.isfinite(flat).all(axis=1)
    with np.errstate(invalid="ignore"):
        bad |= (np.nanmin(flat, axis=1, initial=np.inf) < low - tolerance) | \
               (np.nanmax(flat, axis=1, initial=-np.inf) > high + tolerance)
    errors: list[InputError | None] = [None] * n
    for i in np.flatnonzero(bad):
        errors[i] = _array_error(values[i], spec)
        values[i] = low
    return normalize(values, spec), errors


def grey_levels_to_input(records: np.ndarray, spec: InputSpec, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [n, C, H, W] -> model input: the float32 steps of preprocess.picture_to_input and
    normalize, in the same order (so the same numbers as a decoded picture), done in place; into `out`
    (float32, at least n rows) when given: a buffer used again, whose memory is not faulted in anew."""
    low, high = spec.value_range
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    if out is None:
        x = records.astype(np.float32)
    else:
        x = out[:len(records)]
        np.copyto(x, records, casting="unsafe")
    x /= np.float32(255.0)
    # Steps that are identities for this spec (x 1, + 0) are skipped: the same numbers, fewer passes.
    if high - low != 1:
        x *= np.float32(high - low)
    if low != 0:
        x += np.float32(low)
    if np.any(mean != 0):
        x -= mean
    if np.any(std != 1):
        x /= std
    return x


def _array_error(value: np.ndarray, spec: InputSpec) -> InputError:
    try:
        array_to_input(value, spec)
    except InputError as e:
        return e
    return InputError("wrong_shape", f"array of shape {list(value.shape)} and type {value.dtype} is not an image")


class BatchScorer:
    """Turns inputs into rows for one model; the caller supplies the inference (a session or a service)."""

    def __init__(self, manifest: Manifest, top_k: int = 3, limits: Limits = DEFAULT_LIMITS,
                 canonical: bool = False, abstain: bool = False):
        """`canonical`: inputs made the way the training images were (/explain's "canonicalize");
        `abstain`: out-of-domain rows withhold their label (/explain's "abstain")."""
        self.manifest = manifest
        self.spec = manifest.input
        check_canonical(canonical, self.spec)  # InputError no_canonical_form for a model without one
        self.canonical, self.abstain = canonical, abstain
        self.active = active_mask(manifest)
        if not 1 <= top_k <= int(self.active.sum()):
            raise InputError("top_k_out_of_range", f"top_k is {top_k}; it must be between 1 and "
                             f"{int(self.active.sum())} (the active prototypes)")
        self.top_k = top_k
        self.limits = limits
        self.prototype_ids = np.array([row.id for row in manifest.prototypes], dtype=np.int64)
        self.weights = np.array([row.weights for row in manifest.prototypes], dtype=np.float64)  # [M, K]
        self.domain = domain_rule(manifest, self.active)  # None: the bundle has no calibration
        # the model.onnx output the rule reads besides the distances (None: none), and its width
        self.features = self.domain.features if self.domain is not None else None
        spec = manifest.model.output(self.features) if self.features else None
        self.feature_width = int(spec.shape[1]) if spec is not None else 0

    def prepare(self, inputs: Sequence[object] | np.ndarray,
                out: np.ndarray | None = None) -> tuple[np.ndarray, list[InputError | None]]:
        """Inputs -> (model input [n, C, H, W], per-input error or None); written into `out` (float32
        [>= n, C, H, W], a buffer the caller uses again) when given.

        An input is picture bytes, a base64 string or nested list (as the service takes them), a
        numpy record (see records_to_input), or an InputError found while reading it; `inputs` may
        also be one array whose first axis runs over the inputs (records of one file).
        """
        if isinstance(inputs, np.ndarray):  # a block of records from one file
            return self._canonical(*records_to_input(inputs, self.spec, out))
        n = len(inputs)
        arrays = [i for i, v in enumerate(inputs) if isinstance(v, np.ndarray)]
        if out is None:
            x = np.zeros((n, self.spec.channels, self.spec.height, self.spec.width), np.float32)
        else:
            x = out[:n]
            x.fill(0.0)
        errors: list[InputError | None] = [None] * n
        for group in _same_shape_runs(inputs, arrays):
            x[group], group_errors = self._canonical(*records_to_input(np.stack([inputs[i] for i in group]),
                                                                       self.spec))
            for i, e in zip(group, group_errors, strict=True):
                errors[i] = e
        for i, value in enumerate(inputs):
            if isinstance(value, np.ndarray):
                continue
            if isinstance(value, InputError):
                errors[i] = value
                continue
            try:
                x[i] = to_input(value, self.spec, self.limits, self.canonical)
            except InputError as e:
                errors[i] = e
        return x, errors

    def _canonical(self, x: np.ndarray, errors: list[InputError | None]) -> tuple[np.ndarray, list]:
        """Records' model input made canonical one by one, as the service does a numeric array's."""
        if self.canonical:
            for i, e in enumerate(errors):
                if e is None:
                    x[i] = canonical_input(x[i], self.spec)
        return x, errors

    def score(self, start: int, input_ids: Sequence[str], inputs: Sequence[object] | np.ndarray,
              infer: Infer) -> Columns:
        """Prepare, run the good inputs through `infer` in RUN_BATCH slices, and shape the rows."""
        return self.score_prepared(start, input_ids, *self.prepare(inputs), infer)

    def score_prepared(self, start: int, input_ids: Sequence[str], x: np.ndarray,
                       errors: Sequence[InputError | None], infer: Infer) -> Columns:
        """score() for inputs prepare() has converted already."""
        return self.rows(start, input_ids, *self.run(x, errors, infer), flat=self.flat(x))

    def flat(self, x: np.ndarray) -> np.ndarray | None:
        """[n] True for each flat picture of prepared input x (inference/domain.py; None without calibration):
        rows() takes it as `flat`."""
        return None if self.domain is None else self.domain.flat(x)

    def run(self, x: np.ndarray, errors: Sequence[InputError | None],
            infer: Infer) -> tuple[np.ndarray, Sequence[InputError | None], np.ndarray, np.ndarray, np.ndarray]:
        """The model on the good inputs of prepared input x, in RUN_BATCH slices -> (ok, errors,
        probabilities, distances, features): rows()'s arguments after the ids. The local engine runs
        this alone in its session threads and shapes the rows elsewhere, so a session never waits on them."""
        ok = np.array([e is None for e in errors], dtype=bool)
        good = x if ok.all() else x[ok]  # no copy of a chunk that is all good
        K, M = len(self.manifest.class_names), len(self.manifest.prototypes)
        probabilities = np.empty((len(good), K), np.float32)
        distances = np.empty((len(good), M), np.float32)
        features = np.empty((len(good), self.feature_width), np.float32)
        for lo in range(0, len(good), RUN_BATCH):
            p, d, *f = infer(good[lo:lo + RUN_BATCH])
            probabilities[lo:lo + RUN_BATCH], distances[lo:lo + RUN_BATCH] = p, d
            if self.features:
                if not f:
                    raise ValueError(f"infer must return the {self.features!r} output the out-of-domain rule reads")
                features[lo:lo + RUN_BATCH] = f[0]
        return ok, errors, probabilities, distances, features

    def rows(self, start: int, input_ids: Sequence[str], ok: np.ndarray, errors: Sequence[InputError | None],
             probabilities: np.ndarray, distances: np.ndarray, features: np.ndarray | None = None,
             flat: np.ndarray | None = None) -> Columns:
        """Outputs of the good inputs (in order) + the errors of the others -> one row per input;
        `features` [n, D]: the output named by self.features, which the out-of-domain rule needs; `flat`:
        self.flat of all the inputs, good or not (a flat picture is out of domain)."""
        nearest = nearest_prototypes_batch(distances, self.top_k, self.active)
        labels = probabilities.argmax(axis=1).astype(np.int64)
        near = np.take_along_axis(distances, nearest, axis=1).astype(np.float64)
        sims = similarity(near)
        # The same numbers as inference.explain.prototype_rows, with the weights for the predicted class.
        contributions = family(self.manifest.family).contribution(self.weights[nearest, labels[:, None]], near, sims)
        in_domain, typicality = (self.domain.judge(distances, labels, features,
                                                   flat=None if flat is None else flat[ok]) if self.domain
                                 else (None, None))
        abstained = ~in_domain if self.abstain and in_domain is not None else None
        return Columns(index=np.arange(start, start + len(input_ids), dtype=np.int64), input_id=input_ids,
                       ok=ok, label=labels, probabilities=probabilities.astype(np.float32, copy=False),
                       prototype_ids=self.prototype_ids[nearest].astype(np.int32),
                       prototype_distances=near.astype(np.float32),
                       prototype_similarities=sims.astype(np.float32),
                       prototype_contributions=contributions.astype(np.float32),
                       class_names=list(self.manifest.class_names), model_name=self.manifest.name,
                       model_version=self.manifest.version,
                       error=[None if e is None else f"{e.reason}: {e}" for e in errors], in_domain=in_domain,
                       typicality=None if typicality is None else typicality.astype(np.float32), abstained=abstained)


def _same_shape_runs(inputs: Sequence[object], indices: list[int]) -> list[list[int]]:
    """Indices of array inputs grouped by (shape, dtype), so each group stacks into one array."""
    groups: dict[tuple, list[int]] = {}
    for i in indices:
        groups.setdefault((inputs[i].shape, inputs[i].dtype.str), []).append(i)
    return list(groups.values())
