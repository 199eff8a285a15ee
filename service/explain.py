"""The numerics of an answer: predictions from the graph's outputs, the nearest prototypes, PNG pictures.

Pure functions of numpy arrays and the manifest; the service only wires them to HTTP.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from export.bundle import Manifest

# ProtoPNet's similarity of a distance d: log((d + 1) / (d + eps)), large when d is near 0.
SIMILARITY_EPSILON = 1e-4


def similarity(distances: np.ndarray) -> np.ndarray:
    return np.log((distances + 1.0) / (distances + SIMILARITY_EPSILON))


def predictions(probabilities: np.ndarray, class_names: list[str]) -> list[dict]:
    """[N, K] probabilities -> one {"label", "class_name", "probabilities"} per image."""
    labels = probabilities.argmax(axis=1)
    return [{"label": int(label), "class_name": class_names[label],
             "probabilities": [float(p) for p in row]}
            for label, row in zip(labels, probabilities, strict=True)]


def active_mask(manifest: Manifest) -> np.ndarray:
    """[M] bool, in the graph's prototype order (the manifest's table order): False where masked."""
    return np.array([row.status == "active" for row in manifest.prototypes], dtype=bool)


def nearest_prototypes(distances: np.ndarray, k: int, active: np.ndarray) -> np.ndarray:
    """Indices of the k active prototypes nearest to one input ([M] distances), nearest first.

    Ties keep the table order (a stable sort), so the answer is the same on every call.
    """
    candidates = np.flatnonzero(active)
    order = np.argsort(distances[candidates], kind="stable")
    return candidates[order[:k]]


def nearest_distance(distances: np.ndarray, active: np.ndarray) -> np.ndarray:
    """[N, M] -> [N]: each input's distance to its nearest active prototype (the drift signal)."""
    return np.where(active[None, :], distances, np.inf).min(axis=1)


def prototype_rows(manifest: Manifest, distances: np.ndarray, indices: np.ndarray, label: int) -> list[dict]:
    """The explanation's prototype entries for one input predicted as `label`.

    weight is the prototype's last-layer weight for the predicted class; contribution is what it
    adds to that class's logit: weight x distance for PrototypeDL (logits = W d), weight x
    similarity for ProtoPNet (logits = W sim).
    """
    rows = []
    for j in indices:
        row = manifest.prototypes[int(j)]
        d = float(distances[j])
        s = float(similarity(np.float64(d)))
        weight = float(row.weights[label])
        rows.append({"id": row.id, "class_identity": row.class_identity,
                     "class_name": manifest.class_names[row.class_identity],
                     "distance": d, "similarity": s, "weight": weight,
                     "contribution": weight * (d if manifest.family == "prototypedl" else s)})
    return rows


def heatmap_picture(similarity_map: np.ndarray, height: int, width: int) -> Image.Image:
    """ProtoPNet: one prototype's [h, w] similarity map -> an L picture of the input's size, brightest
    where the prototype was found (scaled to the map's own min..max, bilinear upsampling)."""
    low, high = float(similarity_map.min()), float(similarity_map.max())
    scaled = (similarity_map - low) / (high - low) if high > low else np.zeros_like(similarity_map)
    small = Image.fromarray((scaled * 255.0 + 0.5).astype(np.uint8), mode="L")
    return small.resize((width, height), Image.Resampling.BILINEAR)


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB along a blue-cyan-yellow-red ramp (the push pictures' ramp)."""
    stops = np.array([[0, 0, 128], [0, 128, 255], [0, 255, 255], [255, 255, 0], [255, 64, 0], [160, 0, 0]],
                     dtype=np.float64)
    pos = np.clip(values, 0.0, 1.0) * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = (pos - lo)[..., None]
    return (stops[lo] * (1 - frac) + stops[lo + 1] * frac).round().astype(np.uint8)


def heatmap_overlay(similarity_map: np.ndarray, pixels: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """ProtoPNet: one prototype's [h, w] similarity map, upsampled to the input (heatmap_picture) and
    blended in colour over the input picture (pixels [C, H, W] in [0, 1]): where it was found."""
    height, width = pixels.shape[1:]
    heat = np.asarray(heatmap_picture(similarity_map, height, width), dtype=np.float64) / 255.0
    base = np.asarray(pixels_to_picture(pixels).convert("RGB"), dtype=np.float64)
    return Image.fromarray((base * (1 - alpha) + heat_colours(heat) * alpha).round().astype(np.uint8))


def pixels_to_picture(pixels: np.ndarray) -> Image.Image:
    """[C, H, W] in [0, 1] (C = 1 or 3) -> an 8-bit L or RGB picture."""
    array = (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(array[0], mode="L") if array.shape[0] == 1 else Image.fromarray(array.transpose(1, 2, 0))


def png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def png_base64(img: Image.Image) -> str:
    return base64.b64encode(png_bytes(img)).decode("ascii")
