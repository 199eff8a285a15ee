"""Run configuration: one YAML file, six sections (outlier_exposure optional), checked on load.

`model.family` chooses the model: "prototypedl" (PrototypeDL) or "protopnet" (ProtoPNet). Each
family reads its own fields and ignores the other's; the `schedule` section is ProtoPNet's. The
family-specific checks are in the family's registry row (training/families.py `config_checks`), the
data-set names in the data-set table (training/datasets.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from protoserve.errors import ProtoserveError
from training.datasets import DATASETS
from training.families import FAMILIES

DECOY_POSITIONS = ("random_corner", "top_left", "top_right", "bottom_left", "bottom_right")


class ConfigError(ProtoserveError):
    pass


@dataclass
class DataConfig:
    # training/datasets.py: "mnist" | "fashion_mnist" | "decoy_mnist" | "cub" (a folder in the CUB-200-2011
    # layout) | "folder" (one sub-folder of pictures per class)
    dataset: str = "mnist"
    root: str | None = None  # None: --data-root, then $PROTOSERVE_DATA_ROOT
    val_size: int = 5000  # taken from the training images (MNIST: 55,000 / 5,000, as the paper)
    split_seed: int = 0
    train_subset: int | None = None  # use only the first N training images (tests, demos)
    crop_to_bbox: bool = True  # cub: crop each image to its bounding box (bounding_boxes.txt), as the paper
    # decoy_mnist: where the square goes, "random_corner" or one corner's name for every image
    decoy_position: str = "random_corner"


@dataclass
class ModelConfig:
    family: str = "prototypedl"
    in_channels: int = 1
    input_size: int = 28
    widths: list[int] = field(default_factory=lambda: [32, 32, 32])  # hidden encoder maps
    latent_maps: int = 10  # last encoder layer; latent = latent_maps x h x w
    hidden_activation: str = "relu"  # "relu" (authors' code) | "sigmoid" (the paper's text)
    n_prototypes: int = 15
    n_classes: int = 10
    fixed_identity_weights: bool = False  # the paper's special case m = K, W = -I (not learned)
    # The paper's ablation: "prototypes" (the prototype layer) | "fully_connected" (a linear layer of
    # n_prototypes outputs in its place); decoder: false drops the decoder and its loss term R;
    # latent_activation: the last encoder layer's ("sigmoid" keeps the latent in the unit hypercube).
    classifier: str = "prototypes"
    decoder: bool = True
    latent_activation: str = "sigmoid"
    # ProtoPNet (n_prototypes, n_classes, in_channels and input_size are shared with PrototypeDL)
    backbone: str = "small_cnn"  # training/backbones.py: resnet18/34/50, vgg11/16/19, densenet121, small_cnn
    backbone_weights: str | None = None  # None: random initialisation; e.g. "IMAGENET1K_V1" if cached
    prototype_dim: int = 64  # D: channels of the add-on layers' output and of each (D, 1, 1) prototype


@dataclass
class LossConfig:
    lambda_R: float = 0.05  # reconstruction
    lambda_R1: float = 0.05  # every prototype near some encoded input
    lambda_R2: float = 0.05  # every encoded input near some prototype
    # ProtoPNet: CE + lambda_cluster * cluster - lambda_separation * separation + lambda_l1 * L1
    lambda_cluster: float = 0.8
    lambda_separation: float = 0.08
    lambda_l1: float = 1e-4  # on the last-layer weights connecting a prototype to the other classes


@dataclass
class TrainConfig:
    epochs: int = 1500
    batch_size: int = 250
    lr: float = 1e-4
    schedule: str = "constant"  # "constant" | "cosine" (with linear warm-up)
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    ema_decay: float = 0.0  # > 0: validate and keep an exponential moving average of the weights
    elastic: bool = True
    elastic_sigma: float = 4.0
    elastic_alpha: float = 20.0
    elastic_fade_epochs: int = 0  # > 0: alpha falls linearly to 0 over the last N epochs
    # with elastic: a random rotation (+- degrees), scaling (1 +- scale) and shift (+- pixels) too
    affine_degrees: float = 0.0
    affine_scale: float = 0.0
    affine_shift: float = 0.0
    seed: int = 0
    checkpoint_every: int = 10
    eval_batch_size: int = 1000
    device: str = "cpu"
    num_threads: int | None = None
    # A checkpoint whose weights start the run (a fine-tune, e.g. with outlier exposure); the
    # optimizers, schedules and RNGs start afresh. --resume continues the run's own last.pt instead.
    init_from: str | None = None

    @property
    def affine(self) -> tuple[float, float, float]:
        """(degrees, scale, shift): what training/elastic.py elastic_deform takes."""
        return self.affine_degrees, self.affine_scale, self.affine_shift


@dataclass
class OutlierExposureConfig:
    """Outlier exposure (training/outlier_exposure.py, docs/outlier_exposure.md): a margin on the
    prototype distances of non-digit images (training/outliers.py). weight 0 turns it off."""

    weight: float = 0.0
    sources: list[str] = field(default_factory=lambda: ["hershey", "animal_shapes", "fontpkg"])
    batch_share: float = 0.25  # outlier images per step, as a share of train.batch_size
    # the margin: this quantile of the in-domain batch's nearest-prototype distances, times margin_scale
    margin_quantile: float = 0.99
    margin_scale: float = 1.0
    # True: the margin's gradient pulls the digits towards their prototypes (see margin_term); False: the
    # margin is a constant of each step and only the outliers are pushed
    pull_digits: bool = True
    # how the outliers meet batch normalisation (ProtoPNet's backbone; PrototypeDL has none): "running",
    # a forward pass of their own with the running statistics, left alone; "batch", one forward pass with
    # the digits, normalised by the statistics of both (as Hendrycks et al.'s code), so that training and
    # inference normalise alike
    batchnorm: str = "running"
    uniform_weight: float = 0.0  # optional: cross-entropy of the outliers' softmax to uniform (Hendrycks)
    # optional: a second margin, on the Mahalanobis distance of the outliers' distance profiles (what the
    # served score's prototype_mahalanobis part reads; training/outlier_exposure.py ProfileMargin)
    profile_weight: float = 0.0
    val_share: float = 0.25  # share of each source's fonts / classes held out for validation
    seed: int = 0
    per_unit: int | None = None  # at most N images per font / class (tests)


@dataclass
class ScheduleConfig:
    """ProtoPNet's stages. train.epochs counts warm-up plus joint epochs; push and last-layer
    optimisation run after the epochs they are scheduled at."""

    warm_epochs: int = 5  # add-on layers and prototypes only (backbone frozen)
    push_start: int = 10  # first push after this epoch
    push_every: int = 10  # then every N epochs; the last epoch always ends with a push
    last_layer_epochs: int = 20  # passes over the push set's similarities after each push
    lr_features: float = 1e-4
    lr_add_on: float = 3e-3
    lr_prototypes: float = 3e-3
    lr_last_layer: float = 1e-4
    lr_step_epochs: int = 5  # joint learning rates times lr_gamma every N joint epochs
    lr_gamma: float = 0.1


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    outlier_exposure: OutlierExposureConfig = field(default_factory=OutlierExposureConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> Config:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping with sections data, model, loss, train, schedule, "
                              "outlier_exposure")
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(sections)
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; expected {sorted(sections)}")
        parts = {}
        for f in dataclasses.fields(cls):
            section_cls = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "train": TrainConfig,
                           "schedule": ScheduleConfig, "outlier_exposure": OutlierExposureConfig}[f.name]
            parts[f.name] = _section(section_cls, raw.get(f.name) or {}, f"{source}: {f.name}")
        config = cls(**parts)
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        m, t = self.model, self.train
        checks = [
            (self.data.dataset in DATASETS, f"data.dataset must be one of {', '.join(repr(n) for n in DATASETS)}"),
            (self.data.decoy_position in DECOY_POSITIONS,
             f"data.decoy_position must be one of {', '.join(repr(p) for p in DECOY_POSITIONS)}"),
            (0 < self.data.val_size < 60000, "data.val_size must be between 1 and 59,999"),
            (m.family in FAMILIES, f"model.family must be {' or '.join(repr(name) for name in FAMILIES)}"),
            (m.hidden_activation in ("relu", "sigmoid"), "model.hidden_activation must be 'relu' or 'sigmoid'"),
            (m.latent_activation in ("relu", "sigmoid"), "model.latent_activation must be 'relu' or 'sigmoid'"),
            (m.classifier in ("prototypes", "fully_connected"),
             "model.classifier must be 'prototypes' or 'fully_connected'"),
            (m.classifier == "prototypes" or not m.fixed_identity_weights,
             "model.fixed_identity_weights needs classifier 'prototypes'"),
            (0.0 <= t.ema_decay < 1.0, "train.ema_decay must be in [0, 1)"),
            (0 <= t.affine_degrees <= 180 and 0 <= t.affine_scale < 1 and t.affine_shift >= 0,
             "train.affine_degrees must be in [0, 180], affine_scale in [0, 1), affine_shift >= 0"),
            (m.n_prototypes > 0 and m.n_classes > 1, "model.n_prototypes must be > 0 and n_classes > 1"),
            (not m.fixed_identity_weights or m.n_prototypes == m.n_classes,
             "model.fixed_identity_weights needs n_prototypes == n_classes"),
            (m.input_size >= 8 and m.in_channels >= 1, "model.input_size must be >= 8, in_channels >= 1"),
            (t.epochs > 0 and t.batch_size > 0 and t.lr > 0, "train.epochs, batch_size and lr must be > 0"),
            (t.schedule in ("constant", "cosine"), "train.schedule must be 'constant' or 'cosine'"),
            (t.checkpoint_every > 0, "train.checkpoint_every must be > 0"),
            *self.outlier_exposure_checks(),
        ]
        if m.family in FAMILIES:
            checks += FAMILIES[m.family].config_checks(self)
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{source}: {message}")


    def outlier_exposure_checks(self) -> list[tuple[bool, str]]:
        o = self.outlier_exposure
        known = ("hershey", "animal_shapes", "fontpkg")  # training/outliers.py SOURCES
        return [
            (o.weight >= 0 and o.uniform_weight >= 0 and o.profile_weight >= 0,
             "outlier_exposure.weight, uniform_weight and profile_weight must be >= 0"),
            (all(s in known for s in o.sources) and len(o.sources) > 0,
             f"outlier_exposure.sources must be a non-empty list of {', '.join(known)}"),
            (0 < o.batch_share <= 1, "outlier_exposure.batch_share must be in (0, 1]"),
            (0 < o.margin_quantile <= 1 and o.margin_scale > 0,
             "outlier_exposure.margin_quantile must be in (0, 1] and margin_scale > 0"),
            (0 < o.val_share < 1, "outlier_exposure.val_share must be in (0, 1)"),
            (o.batchnorm in ("running", "batch"), "outlier_exposure.batchnorm must be 'running' or 'batch'"),
            (o.weight == 0 or self.model.family != "prototypedl" or self.model.classifier == "prototypes",
             "outlier_exposure needs the prototype layer (model.classifier 'prototypes')"),
        ]


def _section(section_cls, raw, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    names = {f.name: f for f in dataclasses.fields(section_cls)}
    unknown = set(raw) - set(names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
    return section_cls(**{key: _coerce(value, names[key].type, f"{where}.{key}") for key, value in raw.items()})


def _coerce(value, annotation: str, where: str):
    """Accept YAML's types where the field's annotation says so; refuse the rest by name."""
    if value is None and "None" in annotation:
        return value
    kind = annotation.split("|")[0].strip()
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "list[int]": isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
        "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[kind]
    if not ok:
        raise ConfigError(f"{where}: expected {kind}, got {value!r}")
    return float(value) if kind == "float" else value


def load_config(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return Config.from_dict(raw, source=str(path))
