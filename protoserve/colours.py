"""The heat-map colours shared by the push pictures (training/) and the service's heatmaps (service/)."""

from __future__ import annotations

import numpy as np

HEAT_STOPS = np.array([[0, 0, 128], [0, 128, 255], [0, 255, 255], [255, 255, 0], [255, 64, 0], [160, 0, 0]],
                      dtype=np.float64)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB along a blue-cyan-yellow-red ramp (a jet-like map)."""
    pos = np.clip(values, 0.0, 1.0) * (len(HEAT_STOPS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(HEAT_STOPS) - 2)
    frac = (pos - lo)[..., None]
    return (HEAT_STOPS[lo] * (1 - frac) + HEAT_STOPS[lo + 1] * frac).round().astype(np.uint8)
