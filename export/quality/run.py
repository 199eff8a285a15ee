"""One report in the making (export/quality/report.py): its options, the model and data, the figures so far."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from bundle.manifest import Bundle, QualityFigure

REPO = Path(__file__).resolve().parents[2]
DEFAULT_JUDGE = REPO / "models" / "protopnet_mnist" / "bundle"
SANITY_LIMIT = 0.5  # mean rank correlation at or above which explanations ignore the learned backbone
WORST = 3  # prototypes listed as the worst of a per-prototype figure


@dataclass(frozen=True)
class QualityOptions:
    sample: int = 500  # validation images drawn (seeded) for the map-based figures and encodings
    seed: int = 0
    curve_images: int = 100  # of the sample, for the deletion and insertion curves
    steps: int = 20  # points of each curve after the first
    noise: float = 0.05  # standard deviation of the stability noise, in pixel units
    grid: int = 4  # cells per side of the image grid whose cells are stability's "parts"
    top_fraction: float = 0.05  # activation precision's top pixels
    encodings: int = 5000  # encodings (ProtoPNet: patches of the sample) for the nearest-neighbour reference
    judge: Path | None = None  # PrototypeDL's independent classifier (default: DEFAULT_JUDGE when present)


@dataclass
class Run:
    """One report in the making: the model, the data, and the figures gathered so far."""

    bundle: Bundle
    model: torch.nn.Module
    images: torch.Tensor  # the whole split [N, C, H, W]
    labels: np.ndarray
    index: np.ndarray  # the sample's positions in the split
    dataset: str
    options: QualityOptions
    figures: dict[str, QualityFigure] = field(default_factory=dict)
    per_prototype: list[dict] = field(default_factory=list)
    not_applicable: dict[str, str] = field(default_factory=dict)
    encodings: np.ndarray | None = None  # [n, D] what the prototypes are compared with (seeded subsample)
    nearest_neighbour: float | None = None  # median nearest-neighbour squared distance between encodings
    settings: dict = field(default_factory=dict)  # what the figures were computed with, beyond the options

    @cached_property
    def identities(self) -> list[int]:
        return [row.class_identity for row in self.bundle.manifest.prototypes]

    @cached_property
    def active(self) -> np.ndarray:
        return np.array([row.status == "active" for row in self.bundle.manifest.prototypes])

    @cached_property
    def sample(self) -> torch.Tensor:
        return self.images[torch.from_numpy(self.index)]

    def each(self, name: str, values) -> None:
        for row, value in zip(self.per_prototype, values, strict=True):
            row[name] = value

    def summary(self, name: str, values: list, reference_kind: str, reference: float | None,
                higher_is_better: bool = True, **detail) -> None:
        """The mean over active prototypes of a per-prototype figure, its worst prototypes beside it."""
        pairs = [(j, v) for j, v in enumerate(values) if self.active[j] and v is not None]
        ranked = sorted(pairs, key=lambda p: p[1], reverse=not higher_is_better)
        ids = [row.id for row in self.bundle.manifest.prototypes]
        worst = [{"id": ids[j], "value": round(float(v), 4)} for j, v in ranked[:WORST]]
        self.figures[name] = QualityFigure(value=float(np.mean([v for _, v in pairs])) if pairs else None,
                                           reference=reference, reference_kind=reference_kind,
                                           higher_is_better=higher_is_better, n=len(pairs),
                                           detail={"worst": worst, **detail})
