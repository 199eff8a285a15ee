"""Masking: a prototype's evidence removed from the last layer, the rest re-fitted around it.

A masked prototype keeps its id, its vector and its row in the bundle's prototype table (status
"masked"); only its column of the last layer is zero, and `fit_last_layer` keeps it exactly zero
(its gradient is zeroed before every step and the column re-zeroed after). With the column zero,
the prototype adds exactly 0 to every logit whatever its distance, in PyTorch and in the exported
graph alike (x + 0 * s == x in floating point for any finite s).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def mask_columns(last_layer: torch.nn.Linear, masked: Sequence[int]) -> None:
    """Zero the last-layer columns of the masked prototype ids (in place)."""
    if len(masked):
        with torch.no_grad():
            last_layer.weight[:, list(masked)] = 0.0


def column_mask(n_prototypes: int, masked: Sequence[int], device=None) -> torch.Tensor:
    """[M] float: 0 for masked prototypes, 1 for active ones."""
    keep = torch.ones(n_prototypes, device=device)
    if len(masked):
        keep[list(masked)] = 0.0
    return keep


def fit_last_layer(last_layer: torch.nn.Linear, head_inputs: torch.Tensor, labels: torch.Tensor,
                   masked: Sequence[int], epochs: int, lr: float, batch_size: int = 250,
                   penalty: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   generator: torch.Generator | None = None) -> dict:
    """Optimise the last layer alone on precomputed head inputs [N, M] (ProtoPNet: similarities,
    PrototypeDL: distances), CE + penalty(weight), the masked columns held at exactly zero."""
    weight = last_layer.weight
    keep = column_mask(weight.shape[1], masked, weight.device)
    mask_columns(last_layer, masked)
    was = weight.requires_grad
    weight.requires_grad_(True)
    optimizer = torch.optim.Adam([weight], lr=lr)
    n, loss = len(labels), torch.tensor(0.0)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            logits = F.linear(head_inputs[idx], weight)
            loss = F.cross_entropy(logits, labels[idx])
            if penalty is not None:
                loss = loss + penalty(weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            weight.grad.mul_(keep)
            optimizer.step()
            mask_columns(last_layer, masked)
    weight.requires_grad_(was)
    with torch.no_grad():
        accuracy = float((F.linear(head_inputs, weight).argmax(1) == labels).float().mean()) if n else 0.0
    return {"last_layer_loss": float(loss.detach()), "last_layer_train_accuracy": accuracy}
