"""The simulated user: judges prototypes from object masks, as the paper's experiment does.

ProtoPNet, rule "box-off-object" (the paper's): a prototype is non-object when its
high-activation box (push's 95th-percentile box in its source image) does not overlap the object
(the digit's ink) at all; it is rejected, every other prototype accepted. The box's overlap with
the decoy is reported beside it.

PrototypeDL, rule "decoded-decoy-energy": a prototype is a whole latent vector, shown as the
decoder's picture of it, so "where it looks" is the whole picture. It is non-object when its
decoded picture carries a decoy: in some corner square (the confounder's size), its mean
brightness exceeds, by more than `margin`, the 99th percentile of the same corner's mean
brightness over the model's reconstructions of clean training images (decoys removed) of the
prototype's class. The reference is the decoder's own pictures, not the raw digits, because a
small decoder paints a faint haze everywhere; only a drawn-in square crosses that line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from registry.verdicts import Verdict, verdict
from training.decoy_mnist import corner_slices
from training.push import object_overlap

BOX_RULE = "box-off-object"
DECODED_RULE = "decoded-decoy-energy"
DECODED_MARGIN = 0.05  # brightness in [0, 1] above what clean digits of the class show
CLEAN_PERCENTILE = 99


@dataclass(frozen=True)
class Judgement:
    prototype_id: int
    non_object: bool
    rule: str
    object_overlap: float | None = None  # fraction of the box on the digit (ProtoPNet)
    decoy_overlap: float | None = None  # ProtoPNet: fraction of the box on the decoy; PrototypeDL: the excess

    def as_verdict(self, round: int) -> Verdict:
        figures = {"object_overlap": self.object_overlap, "decoy_overlap": self.decoy_overlap}
        note = ", ".join(f"{k} {v:.3f}" for k, v in figures.items() if v is not None)
        return verdict(self.prototype_id, "reject" if self.non_object else "accept", round,
                       f"simulated:{self.rule}", note=note or None)


def box_judgements(boxes: np.ndarray, sources: np.ndarray, object_masks: np.ndarray,
                   decoy_masks: np.ndarray | None = None) -> list[Judgement]:
    """ProtoPNet: boxes [M, 4] (y0, y1, x0, x1, end-exclusive), sources [M] push-set indices, masks
    [N, H, W] bool of the push set -> one judgement per prototype (non-object: no pixel on the object)."""
    out = []
    for j, (box, index) in enumerate(zip(boxes.tolist(), sources.tolist(), strict=True)):
        on_object = object_overlap(tuple(box), object_masks[index])
        on_decoy = object_overlap(tuple(box), decoy_masks[index]) if decoy_masks is not None else None
        out.append(Judgement(j, on_object == 0.0, BOX_RULE, on_object, on_decoy))
    return out


def corner_energy(pictures: np.ndarray, size: int) -> np.ndarray:
    """[P, H, W] pictures in [0, 1] -> [P, 4] mean brightness of each corner's size x size square."""
    H, W = pictures.shape[1:]
    return np.stack([pictures[:, rows, cols].mean(axis=(1, 2))
                     for rows, cols in (corner_slices(c, size, H, W) for c in range(4))], axis=1)


def clean_reference(clean_images: np.ndarray, labels: np.ndarray, n_classes: int, size: int,
                    percentile: float = CLEAN_PERCENTILE) -> np.ndarray:
    """[K, 4]: per class and corner, the `percentile` of clean pictures' corner brightness (PrototypeDL:
    the model's reconstructions of clean training images)."""
    energy = corner_energy(clean_images, size)
    return np.stack([np.percentile(energy[labels == k], percentile, axis=0) if (labels == k).any()
                     else np.zeros(4) for k in range(n_classes)])


def decoded_judgements(decoded: np.ndarray, class_identities: list[int], reference: np.ndarray, size: int,
                       margin: float = DECODED_MARGIN) -> list[Judgement]:
    """PrototypeDL: decoded prototypes [M, H, W] in [0, 1] -> judgements by the decoded-decoy-energy rule."""
    excess = corner_energy(decoded, size) - reference[np.asarray(class_identities)]  # [M, 4]
    worst = excess.max(axis=1)
    return [Judgement(j, bool(worst[j] > margin), DECODED_RULE, None, float(worst[j])) for j in range(len(worst))]


def non_object_ids(judgements: list[Judgement], among: list[int] | None = None) -> list[int]:
    """Ids judged non-object (only those in `among`, e.g. the active prototypes, if given)."""
    return [j.prototype_id for j in judgements if j.non_object and (among is None or j.prototype_id in among)]
