"""Run configuration: one YAML file, four sections, checked on load."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from protoserve.errors import ProtoserveError


class ConfigError(ProtoserveError):
    pass


@dataclass
class DataConfig:
    dataset: str = "mnist"  # "mnist" | "fashion_mnist"
    root: str | None = None  # None: --data-root, then $PROTOSERVE_DATA_ROOT
    val_size: int = 5000  # taken from the 60,000 training images (the paper: 55,000 / 5,000)
    split_seed: int = 0
    train_subset: int | None = None  # use only the first N training images (tests, demos)


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


@dataclass
class LossConfig:
    lambda_R: float = 0.05  # reconstruction
    lambda_R1: float = 0.05  # every prototype near some encoded input
    lambda_R2: float = 0.05  # every encoded input near some prototype


@dataclass
class TrainConfig:
    epochs: int = 1500
    batch_size: int = 250
    lr: float = 1e-4
    schedule: str = "constant"  # "constant" | "cosine" (with linear warm-up)
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    elastic: bool = True
    elastic_sigma: float = 4.0
    elastic_alpha: float = 20.0
    seed: int = 0
    checkpoint_every: int = 10
    eval_batch_size: int = 1000
    device: str = "cpu"
    num_threads: int | None = None


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> Config:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping with sections data, model, loss, train")
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(raw) - set(sections)
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; expected {sorted(sections)}")
        parts = {}
        for f in dataclasses.fields(cls):
            section_cls = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "train": TrainConfig}[f.name]
            parts[f.name] = _section(section_cls, raw.get(f.name) or {}, f"{source}: {f.name}")
        config = cls(**parts)
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        m, t = self.model, self.train
        checks = [
            (self.data.dataset in ("mnist", "fashion_mnist"), "data.dataset must be 'mnist' or 'fashion_mnist'"),
            (0 < self.data.val_size < 60000, "data.val_size must be between 1 and 59,999"),
            (m.family == "prototypedl", "model.family must be 'prototypedl'"),
            (m.hidden_activation in ("relu", "sigmoid"), "model.hidden_activation must be 'relu' or 'sigmoid'"),
            (m.n_prototypes > 0 and m.n_classes > 1, "model.n_prototypes must be > 0 and n_classes > 1"),
            (not m.fixed_identity_weights or m.n_prototypes == m.n_classes,
             "model.fixed_identity_weights needs n_prototypes == n_classes"),
            (m.input_size >= 8 and m.in_channels >= 1, "model.input_size must be >= 8, in_channels >= 1"),
            (t.epochs > 0 and t.batch_size > 0 and t.lr > 0, "train.epochs, batch_size and lr must be > 0"),
            (t.schedule in ("constant", "cosine"), "train.schedule must be 'constant' or 'cosine'"),
            (t.checkpoint_every > 0, "train.checkpoint_every must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{source}: {message}")


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
