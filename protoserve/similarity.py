"""ProtoPNet's similarity of a squared distance d: log((d + 1) / (d + eps)), large when d is near 0.

The one definition for both sides of the torch line: training/protopnet.py calls it on tensors,
inference (explanations, batch rows) on numpy arrays and scalars.
"""

from __future__ import annotations

import numpy as np

EPSILON = 1e-4


def similarity(distances):
    """Elementwise log((d + 1) / (d + EPSILON)) of a torch tensor, numpy array or float."""
    ratio = (distances + 1.0) / (distances + EPSILON)
    return ratio.log() if hasattr(ratio, "log") else np.log(ratio)
