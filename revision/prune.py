"""Automatic pruning as in ProtoPNet's prune.py: a prototype whose nearest training examples are
mostly of other classes codes for something the classes share (background, a confounder).

For each prototype, the k nearest training images (each by its nearest patch: the model's
`distances` output, the minimum over positions; PrototypeDL: the encoded image itself) are found;
the prototype is pruned when fewer than `threshold` of them are of its class. ProtoPNet's code
uses k = 6, threshold = 3 and then deletes the prototypes (renumbering the rest); here they are
masked instead, so ids stay stable.
"""

from __future__ import annotations

import torch

K_NEAREST = 6
PRUNE_THRESHOLD = 3


@torch.no_grad()
def nearest_labels(model, images: torch.Tensor, labels: torch.Tensor, k: int = K_NEAREST,
                   batch_size: int = 500) -> torch.Tensor:
    """[M, k] labels of each prototype's k nearest training images (nearest first)."""
    model.eval()
    device = next(model.parameters()).device
    parts = [model(images[i:i + batch_size].to(device)).distances.cpu() for i in range(0, len(labels), batch_size)]
    distances = torch.cat(parts)  # [N, M]
    k = min(k, len(labels))
    # Ties broken by image index (a stable sort), so the choice is reproducible.
    order = torch.sort(distances.T, dim=1, stable=True).indices[:, :k]  # [M, k]
    return labels[order]


def prune_candidates(neighbour_labels: torch.Tensor, class_identities: list[int],
                     threshold: int = PRUNE_THRESHOLD) -> list[int]:
    """Ids of the prototypes with fewer than `threshold` of their nearest neighbours of their class."""
    identity = torch.tensor(class_identities)[:, None]
    own = (neighbour_labels == identity).sum(dim=1)  # [M]
    return (own < threshold).nonzero().flatten().tolist()
