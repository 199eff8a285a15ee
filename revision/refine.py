"""The revision loss terms of interactive prototype revision: Refine (antitypes repel prototypes)
and Con (prototypes stay inside the latent hypercube).

The paper writes Refine = max_i [log((d_i + 1) / (d_i + eps))] * 1 / (-log eps), d_i = ||p_j - q_s||^2,
without saying which index i runs over, and Con = sum_j sum_i v_ij with v_ij = 1 where p_ij lies
outside [0, 1]. The forms implemented here are written out in each docstring.
"""

from __future__ import annotations

import math

import torch

from registry.revision_settings import REFINE_EPSILON


def refine_cost(prototypes: torch.Tensor, antitypes: torch.Tensor, eps: float = REFINE_EPSILON) -> torch.Tensor:
    """Refine = sum_j max_s log((d_js + 1) / (d_js + eps)) / (-log eps),  d_js = ||p_j - q_s||^2.

    prototypes [M, D] (or [M, D, 1, 1]), antitypes [S, D]. The max runs over the antitypes s (each
    prototype is pushed away from its nearest antitype, the one it most resembles), the sum over
    the prototypes j, so every prototype near an antitype feels the force, not only the nearest pair
    of all. Each term lies in (0, 1]: 1 where a prototype coincides with an antitype, near 0 far
    away. No antitypes: 0.

    Right after push a rejected prototype sits exactly on its antitype, where this gradient is zero
    (d_js has zero gradient at p_j = q_s); the other loss terms nudge it off, and from there the
    repulsion is about 2 / ||p_j - q_s||, so it leaves quickly.
    """
    p = prototypes.reshape(prototypes.shape[0], -1)
    if antitypes.numel() == 0:
        return p.sum() * 0.0
    q = antitypes.reshape(antitypes.shape[0], -1).to(p)
    d = ((p[:, None, :] - q[None, :, :]) ** 2).sum(dim=-1)  # [M, S]
    closeness = torch.log((d + 1) / (d + eps))
    return closeness.max(dim=1).values.sum() / (-math.log(eps))


def con_cost(prototypes: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """Con = sum_j sum_i [relu(p_ij - high) + relu(low - p_ij)].

    The paper counts the coordinates outside [low, high] (an indicator, v_ij in {0, 1}); its gradient
    is zero almost everywhere, so it cannot move a prototype back. The nearest differentiable form
    is the hinge: 0 inside the cube, the distance to the cube's face outside (gradient +-1 there).
    """
    p = prototypes.reshape(prototypes.shape[0], -1)
    return (torch.relu(p - high) + torch.relu(low - p)).sum()


def con_count(prototypes: torch.Tensor, low: float = 0.0, high: float = 1.0) -> int:
    """The paper's Con as written: how many coordinates lie outside [low, high] (for reporting)."""
    p = prototypes.reshape(prototypes.shape[0], -1)
    return int(((p > high) | (p < low)).sum())
