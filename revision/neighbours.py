"""The training images nearest to each prototype of a registered version (torch: the training install).

What the review page shows beside a prototype so that a person can judge what it codes for: for
each prototype, the k training images whose distance to it (the model's own `distances` output:
PrototypeDL in latent space, ProtoPNet the nearest patch) is smallest, among the first `limit`
images of the run's training split. Written next to the version's bundle (which stays untouched)
as `neighbours/<prototype>_<rank>.png` and `neighbours.json`; registry/versions.py reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from registry.versions import NEIGHBOURS_FILE, Registry
from training.checkpoint import load_checkpoint
from training.datasets import input_normalization, load_run_data
from training.families import family_of
from training.splits import resolve_data_root

K = 3
LIMIT = 10_000


@torch.no_grad()
def nearest_training_images(checkpoint: Path, data_root: str | None, k: int = K, limit: int = LIMIT,
                            batch_size: int = 500) -> tuple[list[list[tuple[int, int, float]]], torch.Tensor]:
    """Per prototype: [(training index, label, distance)] nearest first; and the images [n, C, H, W] in [0, 1]."""
    model, config, _ = load_checkpoint(checkpoint)
    model.eval()
    train = load_run_data(config, resolve_data_root(data_root, config.data.root))["train"]
    n = min(limit, len(train))
    images = train.images[:n] if isinstance(train.images, torch.Tensor) else train.images[torch.arange(n)]
    fam = family_of(model)
    where = list(fam.graph_outputs(model)).index("distances")
    distances = torch.cat([fam.graph_forward(model, images[i:i + batch_size])[where]
                           for i in range(0, n, batch_size)])  # [n, M]
    nearest = distances.topk(min(k, n), dim=0, largest=False)  # [k, M]
    rows = [[(int(i), int(train.labels[i]), float(d)) for d, i in zip(nearest.values[:, j], nearest.indices[:, j],
                                                                         strict=True)]
            for j in range(distances.shape[1])]
    mean, std = input_normalization(config.data.dataset)
    if mean is not None:
        images = images * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    return rows, images.clamp(0, 1)


def write_neighbours(registry: Registry, version: str, data_root: str | None, k: int = K,
                     limit: int = LIMIT) -> Path:
    """Compute and store a version's nearest training images (see the module docstring)."""
    row = registry.store.version(version)
    if row.checkpoint is None:
        raise ValueError(f"version {version} has no checkpoint to find its neighbours with")
    rows, images = nearest_training_images(registry.checkpoint_path(version), data_root, k, limit)
    folder = registry.version_dir(version)
    (folder / "neighbours").mkdir(parents=True, exist_ok=True)
    table = {}
    for j, found in enumerate(rows):
        table[str(j)] = []
        for rank, (index, label, distance) in enumerate(found):
            name = f"neighbours/{j:03d}_{rank}.png"
            pixels = images[index].mul(255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)).save(folder / name)
            table[str(j)].append({"index": index, "label": label, "distance": distance, "image": name})
    staging = folder / f".{NEIGHBOURS_FILE}.partial"
    staging.write_text(json.dumps({"among_first_training_images": len(images), "nearest": table}) + "\n")
    staging.replace(folder / NEIGHBOURS_FILE)
    return folder / NEIGHBOURS_FILE
