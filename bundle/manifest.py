"""Model bundles: the manifest schema, and the one reader and writer of a bundle directory.

Pure Python (pydantic, hashlib, json): no torch, no onnx, so the service imports it freely.

Public API (kept small; the service depends on it):
    SCHEMA_VERSION, MANIFEST_FILE
    BundleError(ProtoserveError)     one line: "<file>: <problem>"
    Manifest and its parts            InputSpec, TensorSpec, GraphSpec, PrototypeRow, Metrics,
                                      ParityFigures, ProbeSpec, Tolerance, TrainingInfo, Lineage (optional),
                                      QualityReport (QualityFigure, PrototypeQuality): the optional `quality`
    Bundle                            a read and checked bundle: .path, .manifest, .model_path,
                                      .decoder_path (None when the family has no decoder),
                                      .probe_path, .file(name), .prototype(id), .output_names
    read_bundle(path) -> Bundle       checks schema version, schema, manifest digest and the
                                      sha256 of every file; raises BundleError on the first problem
    read_manifest(path) -> Manifest   manifest.json alone: schema, consistency, digest (not the files)
    write_manifest(dir, manifest)     fills in files + digest, writes manifest.json, re-reads it
    sha256_file(path) -> str

Running the graphs (ONNX Runtime provider choice, the golden probe) lives in bundle/runtime.py,
which has no torch import either.

A bundle is one immutable model version:
    manifest.json   this schema; lists every other file with its sha256
    model.onnx      image -> the family's outputs (names and shapes listed in the manifest)
    decoder.onnx    PrototypeDL: latent -> image (absent for families without a decoder)
    probe.npz       the golden probe: a few inputs with their expected outputs
    prototypes/     one PNG per prototype
Families differ in outputs (ProtoPNet's `similarity_maps`) and provenance, not in format.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bundle.families import FAMILIES, family
from protoserve.errors import ProtoserveError

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"

# The family names the schema accepts: the serving-side registry's (bundle/families.py).
FamilyName = Literal[tuple(FAMILIES)]


class BundleError(ProtoserveError):
    """A bundle that is missing, damaged, edited or not of this schema: "<file>: <problem>"."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CanonicalForm(_Strict):
    """How the training images were made from their originals, so an upload can be made the same way
    (inference/canonical.py; the request option "canonicalize"). Absent: the model has no such form."""

    ink: Literal["light_on_dark", "dark_on_light"] = "light_on_dark"
    box: int = Field(gt=0)  # the ink's bounding box was fitted into box x box pixels, aspect ratio kept
    centre: Literal["mass", "box"] = "mass"  # then placed with its centre of mass (or box) at the centre
    description: str = ""


class InputSpec(_Strict):
    """What `image` must hold: pixels scaled to value_range, then (x - mean) / std per channel."""

    name: str = "image"
    dtype: Literal["float32"] = "float32"
    layout: Literal["NCHW"] = "NCHW"
    channels: int = Field(gt=0)
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    value_range: tuple[float, float] = (0.0, 1.0)
    mean: list[float]
    std: list[float]
    description: str = ""
    canonical: CanonicalForm | None = None


class TensorSpec(_Strict):
    """One graph input or output; symbolic axes are strings (the batch axis is "N")."""

    name: str
    dtype: Literal["float32", "int64"] = "float32"
    shape: list[int | str]


class GraphSpec(_Strict):
    file: str
    opset: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    prototype_initializer: str | None = None  # the graph initializer holding the prototype vectors

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)


class PrototypeRow(_Strict):
    id: int = Field(ge=0)  # stable across revisions
    class_identity: int = Field(ge=0)
    weights: list[float]  # its column of the last layer: K floats
    status: Literal["active", "masked"] = "active"
    provenance: dict | None = None  # ProtoPNet: training image index, patch and receptive-field boxes
    image: str | None = None  # path inside the bundle


class Tolerance(_Strict):
    """Two arrays agree when |a - b| <= atol + rtol * |b| everywhere (b the reference; bundle/parity.py)."""

    atol: float = Field(ge=0)
    rtol: float = Field(ge=0)


class ParityFigures(_Strict):
    """ONNX Runtime (CPU) against PyTorch eval mode on the same images, and the limits they met."""

    images: int
    max_abs_probability_diff: float
    max_rel_distance_diff: float
    argmax_mismatches: int
    top3_mismatches: int  # nearest-prototype id sets that differ other than by an exact tie
    top3_ties: int  # images whose top-3 differed only at an exact tie
    probability_atol: float
    distance_rtol: float
    # The out-of-domain features output (bundle/families.py domain_features): its largest difference relative to
    # its largest magnitude (None: a bundle exported before it was compared).
    max_rel_feature_diff: float | None = None
    feature_rtol: float | None = None
    # The combined limit each compared output was held to (bundle/parity.py), and the largest share of
    # it any element used (|a - b| / (atol + rtol * |b|); at most 1 passes). None: an older bundle, whose
    # limits were the relative ones above.
    limits: dict[str, Tolerance] | None = None
    limit_used: dict[str, float] | None = None


DRIFT_QUANTILES = ("0.5", "0.95", "1.0")


def drift_quantiles(nearest) -> dict[str, float]:
    """Images' distances to their nearest active prototype [N] -> {quantile: value} for DRIFT_QUANTILES
    (Metrics.nearest_distance_quantiles; the service's reference when a bundle lacks them)."""
    import numpy as np

    return {q: float(np.quantile(nearest, float(q))) for q in DRIFT_QUANTILES}


class Metrics(_Strict):
    test_accuracy: float | None = None  # PyTorch eval mode on the test set
    onnx_test_accuracy: float | None = None
    test_images: int | None = None
    parity: ParityFigures | None = None
    # Quantile (DRIFT_QUANTILES) -> the test images' squared L2 distance to their nearest active
    # prototype, through ONNX Runtime: the service's drift reference (protoserve_reference_nearest_distance).
    nearest_distance_quantiles: dict[str, float] | None = None


class OutlierFigures(_Strict):
    """The calibrated rule on non-digit drawings from fonts and animal classes that no training run draws
    from (training/outliers.py, the held-out part), against the test split: how many it flags at the
    bundle's threshold, and how well its score ranks them (AUROC, and the share of test images flagged by
    the threshold that catches 95% of them, FPR95)."""

    set: str
    images: int = Field(gt=0)
    units: list[str]  # the fonts and classes the images come from
    licences: dict[str, str]  # distribution -> licence, from the installed wheels' metadata
    test_images: int = Field(gt=0)
    flagged: float  # share of the outlier images out of domain at the bundle's threshold
    test_flagged: float  # share of the test images out of domain (calibrated: false_alarm_rate)
    auroc: float
    fpr95: float
    # the checkpoint's outlier_exposure section when it was trained with the term, else None
    trained_with: dict | None = None


DomainScore = Literal["nearest_distance", "class_nearest_distance", "mean3_distance", "prototype_mahalanobis",
                      "nearest_and_mahalanobis", "latent_mahalanobis", "latent_and_prototypes"]


class DomainCalibration(_Strict):
    """The out-of-domain rule (inference/domain.py), calibrated at export on the validation split only.

    An input's `score` (larger = further from every case the model knows) above `threshold` is out of
    domain; `threshold` is the validation scores' (1 - false_alarm_rate) quantile. `quantiles` holds
    the validation scores at `levels` (typicality: the share of validation images scoring higher).
    `candidates` records each score's validation AUROC against `proxy` (bundles calibrated by choosing
    the best of them; newer ones use a fixed score and keep the figures as a check).
    """

    score: DomainScore
    split: Literal["validation"] = "validation"
    images: int = Field(gt=0)  # validation images the threshold and quantiles come from
    false_alarm_rate: float = Field(gt=0, lt=1)
    threshold: float
    validation_false_alarm_rate: float
    levels: list[float]
    quantiles: list[float]
    candidates: dict[str, float] = {}
    proxy: str = ""
    # prototype_mahalanobis (and nearest_and_mahalanobis): the L2 distance profile's mean per predicted
    # class [K][M] and the shared precision matrix [M][M], fitted on the other half of the validation
    # split (fit_images of them).
    class_means: list[list[float]] | None = None
    precision: list[list[float]] | None = None
    fit_images: int | None = None
    # nearest_and_mahalanobis, latent_and_prototypes: each part's validation scores at `levels` (their
    # tail probabilities are combined)
    components: dict[str, list[float]] | None = None
    # latent_mahalanobis (and latent_and_prototypes): the model.onnx output holding the input's place in
    # the latent space, its mean per predicted class [K][D] and the shared precision [D][D] (fit half)
    features: str | None = None
    feature_means: list[list[float]] | None = None
    feature_precision: list[list[float]] | None = None
    # The rule measured at export on drawings that are not digits (export/outlier_figures.py); None in
    # bundles exported before it, or when the outlier data is not installed or the input is not 28x28 grey.
    outliers: OutlierFigures | None = None


class ProbeSpec(_Strict):
    """The golden probe: inputs and expected outputs in `file` (npz), compared with these limits."""

    file: str = "probe.npz"
    images: int
    atol: float
    rtol: float
    # Per output name: its own limit (bundle/parity.py); outputs not named here, and every output of an
    # older bundle, are held to atol and rtol above.
    limits: dict[str, Tolerance] | None = None


class TrainingInfo(_Strict):
    config: dict
    source_commit: str | None = None
    source_dirty: bool | None = None
    checkpoint_sha256: str | None = None
    epoch: int | None = None
    metrics: dict = {}  # the checkpoint's own figures (validation accuracy, losses)


class QualityFigure(_Strict):
    """One figure of the explanation-quality report, beside the reference it is read against."""

    value: float | None
    reference: float | None = None
    reference_kind: str | None = None  # what the reference is: "chance", "random order", "randomised model", ...
    higher_is_better: bool | None = None
    n: int | None = None  # how many cases (images, image-prototype pairs, prototypes) it summarises
    detail: dict = {}  # e.g. the worst prototypes, the curves, a pass/fail verdict


class PrototypeQuality(_Strict):
    id: int  # the prototype table's id
    figures: dict = {}  # the per-prototype figures by name (None where one does not apply)


class QualityReport(_Strict):
    """The explanation-quality report (export/quality/): computed on a data split by a fixed seed."""

    data: str  # the data set
    split: str  # "validation"
    split_size: int
    sample_size: int  # images drawn (seeded) from the split for the map-based figures
    seed: int
    settings: dict = {}  # noise, grid, top fraction, steps, judge bundle ...
    computed_at: datetime
    seconds: float | None = None
    figures: dict[str, QualityFigure]
    not_applicable: dict[str, str] = {}  # figure name -> why the family or data has none
    prototypes: list[PrototypeQuality] = []
    picture: str | None = None  # file in the bundle (PNG)
    page: str | None = None  # file in the bundle (HTML)


class Lineage(_Strict):
    """How a version came from its parent: revised (revision/rounds.py: enough to trace a served model
    back to every verdict that made it) or retrained on a new schedule ("retrain": no verdicts; the
    comparison holds both test accuracies). Absent on a version trained with no parent named."""

    parent: str | None = None  # name:version of the parent bundle; None when revised from a bare checkpoint
    parent_checkpoint_sha256: str | None = None
    mode: Literal["mask", "prune", "revise", "retrain"]
    rounds: int = Field(ge=0)
    verdicts: list[dict] = []  # registry/verdicts.py objects, in the order they were given
    antitypes: list[dict] = []  # {"prototype_id", "round", "vector"[, "source": ProtoPNet (push index, row, col)]}
    masked: list[int] = []
    # revised: the revision settings (registry/revision_settings.py RevisionSettings); retrained: the settings
    # of the training config that differ from the parent's, {"section.key": {"parent": ..., "retrained": ...}}
    config: dict = {}
    comparison: dict = {}  # accuracies, prototypes moved / masked / changed class, non-object counts
    history: list[dict] = []  # per round: non-object count, verdicts given, accuracies, seconds


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")  # a valid BentoML tag name
    version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    family: FamilyName  # type: ignore[valid-type]
    created_at: datetime
    class_names: list[str]
    input: InputSpec
    model: GraphSpec
    decoder: GraphSpec | None = None
    prototypes: list[PrototypeRow]
    metrics: Metrics
    probe: ProbeSpec
    training: TrainingInfo
    quality: QualityReport | None = None  # the explanation-quality report (protoserve report)
    # Absent in bundles exported before calibration: their answers say in_domain and typicality null.
    domain: DomainCalibration | None = None
    lineage: Lineage | None = None  # a revised version's parent and the decisions that made it
    files: dict[str, str] = {}  # relative path -> sha256, every file but manifest.json
    manifest_sha256: str | None = None  # digest of this manifest's other fields (catches edits)

    @property
    def tag(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class Bundle:
    """A bundle that passed read_bundle's checks."""

    path: Path
    manifest: Manifest

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def model_path(self) -> Path:
        return self.file(self.manifest.model.file)

    @property
    def decoder_path(self) -> Path | None:
        return self.file(self.manifest.decoder.file) if self.manifest.decoder else None

    @property
    def probe_path(self) -> Path:
        return self.file(self.manifest.probe.file)

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.manifest.model.outputs]

    def prototype(self, prototype_id: int) -> PrototypeRow:
        for row in self.manifest.prototypes:
            if row.id == prototype_id:
                return row
        raise BundleError(f"{self.path / MANIFEST_FILE}: no prototype with id {prototype_id}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_digest(raw: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own digest field."""
    body = {k: v for k, v in raw.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_bundle(path: str | Path) -> Bundle:
    """Read and check a bundle directory; BundleError names the first file with a problem."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle directory (no such directory)")
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path}: missing")
    raw = _load_json(manifest_path)
    manifest = _parse_manifest(raw, manifest_path)
    _check_files(path, manifest)
    return Bundle(path=path, manifest=manifest)


def read_manifest(manifest_path: str | Path) -> Manifest:
    """Read and check a manifest.json alone (schema, consistency, digest), before its files are there: what a
    download needs to know which files to fetch and what each must hash to."""
    manifest_path = Path(manifest_path)
    return _parse_manifest(_load_json(manifest_path), manifest_path)


def write_manifest(directory: str | Path, manifest: Manifest) -> Manifest:
    """Hash every file in `directory`, write the completed manifest.json, and read the bundle back."""
    directory = Path(directory)
    files = {name: sha256_file(directory / name) for name in _bundle_files(directory)}
    raw = manifest.model_copy(update={"files": files, "manifest_sha256": None}).model_dump(mode="json")
    for optional in ("lineage", "quality"):  # absent, a manifest reads the same as before the field existed
        if raw.get(optional) is None:
            raw.pop(optional, None)
    raw["manifest_sha256"] = manifest_digest(raw)
    partial = directory / f".{MANIFEST_FILE}.partial"  # renamed into place: a reader never sees half a manifest
    partial.write_text(json.dumps(raw, indent=2) + "\n")
    partial.replace(directory / MANIFEST_FILE)
    return read_bundle(directory).manifest


def copy_as_version(bundle: str | Path, version: str, out: str | Path) -> Path:
    """A copy of `bundle` at `out` whose manifest names `version` (checksums rewritten, so it verifies):
    a second version of one model, for demos and tests of promotes."""
    target = Path(shutil.copytree(bundle, out))
    write_manifest(target, read_bundle(target).manifest.model_copy(update={"version": version}))
    return target


def _load_json(manifest_path: Path) -> dict:
    try:
        raw = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{manifest_path}: not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{manifest_path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _parse_manifest(raw: dict, manifest_path: Path) -> Manifest:
    found = raw.get("schema_version")
    if type(found) is not int or found != SCHEMA_VERSION:  # true and 1.0 equal 1 in Python; not here
        raise BundleError(f"{manifest_path}: schema version {found!r}, this protoserve reads {SCHEMA_VERSION}")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise BundleError(f"{manifest_path}: field {where}: {err['msg']}") from None
    _check_consistency(manifest, manifest_path)
    if raw.get("manifest_sha256") != manifest_digest(raw):
        raise BundleError(f"{manifest_path}: content does not match its manifest_sha256 (edited after export)")
    return manifest


def _check_consistency(m: Manifest, manifest_path: Path) -> None:
    """What the schema alone can't say: sizes agree, the family's outputs and files are there."""
    K = len(m.class_names)
    problems = []
    missing = [n for n in family(m.family).outputs if m.model.output(n) is None]
    if missing:
        problems.append(f"model outputs lack {missing} required for family {m.family!r}")
    if m.domain is not None and m.domain.features is not None and m.model.output(m.domain.features) is None:
        problems.append(f"the out-of-domain calibration reads output {m.domain.features!r}, which model.onnx lacks")
    if [t.name for t in m.model.inputs] != [m.input.name]:
        problems.append(f"model inputs {[t.name for t in m.model.inputs]} are not [{m.input.name!r}]")
    if family(m.family).has_decoder and m.decoder is None:
        problems.append(f"family {m.family!r} needs a decoder")
    if len(m.input.mean) != m.input.channels or len(m.input.std) != m.input.channels:
        problems.append(f"input mean/std need {m.input.channels} values (one per channel)")
    if any(s <= 0 for s in m.input.std):
        problems.append("input std must be positive")
    ids = [p.id for p in m.prototypes]
    if len(set(ids)) != len(ids):
        problems.append("prototype ids are not unique")
    for p in m.prototypes:
        if len(p.weights) != K:
            problems.append(f"prototype {p.id} has {len(p.weights)} weights, expected {K} (one per class)")
        if p.class_identity >= K:
            problems.append(f"prototype {p.id} has class_identity {p.class_identity}, only {K} classes")
    for name, count in (("logits", K), ("probabilities", K), ("distances", len(m.prototypes))):
        spec = m.model.output(name)
        if spec is not None and spec.shape[1:] != [count]:
            problems.append(f"output {name} has shape {spec.shape}, expected ['N', {count}]")
    referenced = [m.model.file, m.probe.file] + ([m.decoder.file] if m.decoder else [])
    referenced += [p.image for p in m.prototypes if p.image]
    referenced += [f for f in (m.quality.picture, m.quality.page) if f] if m.quality else []
    problems += [f"{name} is referenced but not listed in files" for name in referenced if name not in m.files]
    problems += [f"file entry {name!r} is not a path inside the bundle" for name in m.files
                 if not _is_inside(name) or name == MANIFEST_FILE]
    if problems:
        raise BundleError(f"{manifest_path}: {problems[0]}")


def _check_files(path: Path, m: Manifest) -> None:
    for name, expected in m.files.items():
        file = path / name
        if not file.is_file():
            raise BundleError(f"{file}: missing")
        if sha256_file(file) != expected:
            raise BundleError(f"{file}: sha256 does not match the manifest (damaged or edited)")
    unlisted = sorted(set(_bundle_files(path)) - set(m.files))
    if unlisted:
        raise BundleError(f"{path / unlisted[0]}: not listed in the manifest (added after export)")


def _bundle_files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST_FILE)


def _is_inside(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name
