"""What every data set's loader shares: the in-memory Split, the data error, and the data root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from protoserve.errors import ProtoserveError
from protoserve.settings import settings, variable


class DataError(ProtoserveError):
    pass


@dataclass
class Split:
    """Images as float32 [N, C, H, W] (MNIST-like: C = 1, in [0, 1]) and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def resolve_data_root(cli_value: str | None, config_value: str | None = None) -> Path:
    """--data-root, else the config's data.root, else $PROTOSERVE_DATA_ROOT."""
    root = cli_value or config_value or settings().data_root
    if not root:
        raise DataError(f"no data root: pass --data-root DIR or set ${variable('data_root')}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data root {path}: no such directory")
    return path
