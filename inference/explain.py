"""The numerics of an answer: predictions from the graph's outputs, the nearest prototypes, PNG pictures.

Pure functions of numpy arrays and the manifest; the service only wires them to HTTP.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from bundle.families import family
from bundle.manifest import Manifest
from protoserve.colours import overlay_heat, unit_scale
from protoserve.similarity import similarity

__all__ = ["similarity"]  # re-exported: the answers' similarity is protoserve.similarity's


def predictions(probabilities: np.ndarray, class_names: list[str]) -> list[dict]:
    """[N, K] probabilities -> one {"label", "class_name", "probabilities"} per image."""
    labels = probabilities.argmax(axis=1).tolist()
    return [{"label": label, "class_name": class_names[label], "probabilities": row}
            for label, row in zip(labels, probabilities.tolist(), strict=True)]


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


def nearest_prototypes_batch(distances: np.ndarray, k: int, active: np.ndarray) -> np.ndarray:
    """[N, M] distances -> [N, k] indices of the nearest active prototypes, nearest first.

    The batch form of nearest_prototypes (same stable tie order, tested equal).
    """
    candidates = np.flatnonzero(active)
    order = np.argsort(distances[:, candidates], axis=1, kind="stable")[:, :k]
    return candidates[order]


def nearest_distance(distances: np.ndarray, active: np.ndarray) -> np.ndarray:
    """[N, M] -> [N]: each input's distance to its nearest active prototype (the drift signal)."""
    return np.where(active[None, :], distances, np.inf).min(axis=1)


def prototype_rows(manifest: Manifest, distances: np.ndarray, indices: np.ndarray, label: int) -> list[dict]:
    """The explanation's prototype entries for one input predicted as `label`.

    weight is the prototype's last-layer weight for the predicted class; contribution is what it
    adds to that class's logit (the family's contribution rule, bundle/families.py).
    """
    rows, entry = [], family(manifest.family)
    for j in indices:
        row = manifest.prototypes[int(j)]
        d = float(distances[j])
        s = float(similarity(np.float64(d)))
        weight = float(row.weights[label])
        rows.append({"id": row.id, "class_identity": row.class_identity,
                     "class_name": manifest.class_names[row.class_identity],
                     "distance": d, "similarity": s, "weight": weight,
                     "contribution": entry.contribution(weight, d, s)})
    return rows


def bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """[n_out, n_in]: resampling by cubic convolution, as torch's interpolate(mode="bicubic",
    align_corners=False) does (Keys' kernel with a = -0.75, edge samples repeated)."""

    def kernel(x: np.ndarray) -> np.ndarray:
        x = np.abs(x)
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return np.where(x <= 1, near, np.where(x < 2, far, 0.0))

    source = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(source).astype(int)
    matrix = np.zeros((n_out, n_in))
    for offset in (-1, 0, 1, 2):
        taps = base + offset
        np.add.at(matrix, (np.arange(n_out), taps.clip(0, n_in - 1)), kernel(source - taps))
    return matrix


def upsample(similarity_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w] -> [height, width] by bicubic interpolation: the push pictures' upsampling
    (training/push.py, torch's bicubic as in the paper's code), tested equal."""
    h, w = similarity_map.shape
    return bicubic_matrix(h, height) @ similarity_map.astype(np.float64) @ bicubic_matrix(w, width).T


def heatmap_picture(similarity_map: np.ndarray, height: int, width: int) -> Image.Image:
    """ProtoPNet: one prototype's [h, w] similarity map -> an L picture of the input's size, brightest
    where the prototype was found (bicubic upsampling, then scaled to its own min..max)."""
    scaled = unit_scale(upsample(similarity_map, height, width))
    return Image.fromarray((scaled * 255.0 + 0.5).astype(np.uint8), mode="L")


def heatmap_overlay(similarity_map: np.ndarray, pixels: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """ProtoPNet: one prototype's [h, w] similarity map, upsampled to the input and blended in colour
    over the input picture (pixels [C, H, W] in [0, 1]): where it was found. The same blend as the
    push pictures' activation overlay."""
    height, width = pixels.shape[1:]
    base = np.asarray(pixels_to_picture(pixels).convert("RGB"), dtype=np.float64)
    return Image.fromarray(overlay_heat(base, upsample(similarity_map, height, width), alpha))


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
