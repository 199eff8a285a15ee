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


def unit_scale(values: np.ndarray) -> np.ndarray:
    """values scaled to their own min..max -> [0, 1]; all zeros for a flat map."""
    low, high = values.min(), values.max()
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def overlay_heat(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend an upsampled map [H, W] (any range; scaled to [0, 1]) in heat colours over an image
    [H, W, 3] -> uint8 [H, W, 3]: the push pictures' activation overlay and the service's heatmap."""
    return (rgb * (1 - alpha) + heat_colours(unit_scale(heat)) * alpha).round().astype(np.uint8)
