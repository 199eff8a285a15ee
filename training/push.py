"""Push (prototype projection): each prototype becomes the nearest latent patch of its own class.

For prototype j of class c, over every image of class c in the push set (the unaugmented
training images) and every position (row, col) of its latent map z, find the patch z[:, row, col]
nearest to p_j, and set p_j to it. The model records, per prototype, the source image index in
the push set, the patch position, its receptive-field box in the source image, and the
high-activation box: the smallest box holding the pixels where the similarity map, upsampled to
the image, reaches its 95th percentile.

Push during interactive revision (revision/rounds.py) may be given antitypes q_s, the vectors of
prototypes a user rejected. It then never projects a prototype onto a patch the antitypes stand for:

    patch z is excluded  when  min_s ||z - q_s||^2 < min_k ||z - p_k||^2

i.e. the antitypes and the prototypes (all of them, as they are before this push) split the latent
space by nearest neighbour, and a patch in an antitype's cell is not a candidate: p_j becomes the
nearest own-class patch outside every antitype's cell. Refine has moved the prototypes away from
the antitypes, so this keeps the push from undoing that by landing on another patch of a rejected
kind (empty background looks alike everywhere). The cells are taken against every prototype, not
only p_j, because Refine can move p_j far from all patches, where every patch would be nearer to
some antitype than to p_j alone. Where all own-class patches are excluded, the prototype falls back
to its nearest own-class patch, and the result says so. The rule uses only latent distances, never
object masks.

Under torch.distributed each rank searches its shard of the push set (global indices) and the
candidates are gathered: the winner is the smallest (distance, image index, row, col), the same
rule a single process applies, so both pick the same patches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw

from protoserve.colours import overlay_heat
from training.families import FamilyError, PrototypeRecord
from training.protopnet import ProtoPNet, similarity, squared_distance_maps, subtracted_distance_maps

ACTIVATION_PERCENTILE = 95


@dataclass
class PushResult:
    distances: torch.Tensor  # [M] distance from the old prototype to the chosen patch
    source: torch.Tensor  # [M, 3] push-set index, row, col
    vectors: torch.Tensor  # [M, D] the chosen patches
    fallback: torch.Tensor | None = None  # [M] bool: every own-class patch was antitype-like (antitypes given)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def nearest_own_class_patches(model: ProtoPNet, images, labels: torch.Tensor, indices: torch.Tensor,
                              batch_size: int = 500, antitypes: torch.Tensor | None = None) -> PushResult:
    """Search images (a tensor or any indexable of [B, C, H, W] batches) with their push-set indices.

    antitypes [S, D] (optional): patches nearer to an antitype than to every prototype are excluded
    (module docstring); a prototype with no allowed patch takes its nearest own-class patch."""
    M, D = model.prototypes.shape[:2]
    device = model.prototypes.device
    identity = model.prototype_class_identity.argmax(dim=1)  # [M]
    screen = antitypes is not None and antitypes.numel() > 0
    anti = antitypes.reshape(-1, D, 1, 1).to(model.prototypes) if screen else None
    best = [_Best(M, D, model.prototypes, device) for _ in range(2 if screen else 1)]  # [allowed, any]
    for start in range(0, len(labels), batch_size):
        x = images[start:start + batch_size].to(device)
        y = labels[start:start + batch_size].to(device)
        z = model.latent(x)  # [B, D, h, w]
        # Screening compares two small distances: the subtracted form keeps them exact to float32.
        maps = (subtracted_distance_maps if screen else squared_distance_maps)(z, model.prototypes)  # [B, M, h, w]
        own = (y[:, None] == identity[None, :])[:, :, None, None]  # [B, M, 1, 1]
        nearest_prototype = maps.amin(dim=1, keepdim=True)  # [B, 1, h, w]
        maps = torch.where(own, maps, torch.full_like(maps, torch.inf))
        batch_indices = indices[start:start + batch_size].to(device)
        if screen:
            nearest_antitype = subtracted_distance_maps(z, anti).amin(dim=1, keepdim=True)  # [B, 1, h, w]
            excluded = (nearest_antitype < nearest_prototype).expand_as(maps)
            allowed = torch.where(excluded, torch.full_like(maps, torch.inf), maps)
            best[0].update(allowed, z, batch_indices)
        best[-1].update(maps, z, batch_indices)
    if _distributed():
        for b in best:
            b.d, b.src, b.vec = _gather_best(b.d, b.src, b.vec)
    if not screen:
        return PushResult(distances=best[0].d, source=best[0].src, vectors=best[0].vec)
    fallback = best[0].src[:, 0] < 0
    return PushResult(distances=_pick(fallback, best[1].d, best[0].d), source=_pick(fallback, best[1].src, best[0].src),
                      vectors=_pick(fallback, best[1].vec, best[0].vec), fallback=fallback)


def _pick(rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a where rows [M] is true, else b (row-wise, any trailing shape)."""
    return torch.where(rows.view(-1, *[1] * (a.dim() - 1)), a, b)


class _Best:
    """The running nearest patch per prototype over the batches of a push."""

    def __init__(self, M: int, D: int, prototypes: torch.Tensor, device):
        self.d = torch.full((M,), torch.inf, device=device)
        self.src = torch.full((M, 3), -1, dtype=torch.long, device=device)
        self.vec = prototypes.detach().view(M, D).clone()

    def update(self, maps: torch.Tensor, z: torch.Tensor, indices: torch.Tensor) -> None:
        M, h, w = maps.shape[1], maps.shape[2], maps.shape[3]
        flat = maps.permute(1, 0, 2, 3).reshape(M, -1)  # [M, B*h*w], image-major then row-major
        d, where = flat.min(dim=1)  # the first minimum: lowest image, then row, then col
        better = d < self.d
        if better.any():
            b, pos = where // (h * w), where % (h * w)
            row, col = pos // w, pos % w
            src = torch.stack([indices[b], row, col], dim=1)
            vec = z[b, :, row, col]  # [M, D]
            self.d = torch.where(better, d, self.d)
            self.src = torch.where(better[:, None], src, self.src)
            self.vec = torch.where(better[:, None], vec, self.vec)


def _gather_best(d: torch.Tensor, src: torch.Tensor, vec: torch.Tensor):
    """Every rank's candidates -> the smallest (distance, index, row, col) per prototype."""
    world = dist.get_world_size()
    all_d = [torch.empty_like(d) for _ in range(world)]
    all_src = [torch.empty_like(src) for _ in range(world)]
    all_vec = [torch.empty_like(vec) for _ in range(world)]
    dist.all_gather(all_d, d)
    dist.all_gather(all_src, src)
    dist.all_gather(all_vec, vec)
    d, src, vec = torch.stack(all_d), torch.stack(all_src), torch.stack(all_vec)  # [R, M, ...]
    M = d.shape[1]
    choice = []
    for j in range(M):
        keys = [(float(d[r, j]), *src[r, j].tolist()) for r in range(world)
                if src[r, j, 0] >= 0]
        ranks = [r for r in range(world) if src[r, j, 0] >= 0]
        choice.append(ranks[min(range(len(keys)), key=keys.__getitem__)] if keys else 0)
    rows = torch.arange(M)
    choice = torch.tensor(choice)
    return d[choice, rows], src[choice, rows], vec[choice, rows]


def activation_box(similarity_map: torch.Tensor, image_size: int,
                   percentile: float = ACTIVATION_PERCENTILE) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), end-exclusive: the box around the upsampled map's top (100 - percentile)%."""
    up = upsample(similarity_map, image_size)
    threshold = np.percentile(up, percentile)
    ys, xs = np.nonzero(up >= threshold)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def object_overlap(box: tuple[int, int, int, int], mask: np.ndarray) -> float:
    """Fraction of a box's pixels (y0, y1, x0, x1, end-exclusive) on the foreground of a bool mask."""
    y0, y1, x0, x1 = box
    region = mask[y0:y1, x0:x1]
    return float(region.mean()) if region.size else 0.0


def object_overlaps(model: ProtoPNet, images) -> list[float | None]:
    """Per prototype: object_overlap of its high-activation box with its source image's segmentation
    mask (images.mask(index), CUB-layout folders); None where there is no mask."""
    masks = getattr(images, "mask", None)
    out = []
    for j in range(model.prototypes.shape[0]):
        index = int(model.push_source[j, 0])
        mask = masks(index) if masks is not None and index >= 0 else None
        out.append(None if mask is None else object_overlap(tuple(model.push_activation_box[j].tolist()), mask))
    return out


def upsample(similarity_map: torch.Tensor, image_size: int) -> np.ndarray:
    """[h, w] -> [image_size, image_size] by bicubic interpolation (as the paper's code)."""
    up = F.interpolate(similarity_map[None, None].float(), size=(image_size, image_size), mode="bicubic",
                       align_corners=False)
    return up[0, 0].cpu().numpy()


@torch.no_grad()
def push_prototypes(model: ProtoPNet, images, labels: torch.Tensor, indices: torch.Tensor | None = None,
                    batch_size: int = 500, source_images=None, antitypes: torch.Tensor | None = None) -> PushResult:
    """Project every prototype onto its nearest own-class patch and record where it came from.

    `images`/`labels` are this process's part of the push set and `indices` their positions in the
    whole push set (default 0..n-1). `source_images(index)` returns one push-set image [C, H, W]
    by global index (default: images[index], right when this process holds the whole set).
    `antitypes` [S, D]: never land on a patch nearer to an antitype than to every prototype (module
    docstring).
    """
    was_training = model.training
    model.eval()
    if indices is None:
        indices = torch.arange(len(labels))
    result = nearest_own_class_patches(model, images, labels, indices, batch_size, antitypes)
    missing = (result.source[:, 0] < 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"push: no image of the class of prototype(s) {missing[:5]} in the push set")
    M, D = model.prototypes.shape[:2]
    model.prototypes.copy_(result.vectors.view(M, D, 1, 1))
    model.push_source.copy_(result.source)
    fetch = source_images or (lambda i: images[i:i + 1][0])
    for j in range(M):
        index, row, col = result.source[j].tolist()
        model.push_rf_box[j] = torch.tensor(model.rf.box(row, col))
        x = fetch(index)[None].to(model.prototypes.device)
        sim = similarity(squared_distance_maps(model.latent(x), model.prototypes[j:j + 1]))[0, 0]
        model.push_activation_box[j] = torch.tensor(activation_box(sim, model.cfg.input_size))
    model.train(was_training)
    return result


@torch.no_grad()
def push_purity(model: ProtoPNet, labels: torch.Tensor) -> float:
    """Fraction of prototypes whose source patch comes from an image of the prototype's own class."""
    src = model.push_source[:, 0].cpu()
    if (src < 0).any():
        return 0.0
    return float((labels[src] == torch.tensor(model.class_identities())).float().mean())


# -- pictures ------------------------------------------------------------------------------------

def to_rgb_array(image: torch.Tensor, mean=None, std=None) -> np.ndarray:
    """A model input [C, H, W] (normalised with mean/std if given) -> uint8 [H, W, 3]."""
    x = image.detach().cpu().float()
    if mean is not None:
        x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    x = x.clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return np.repeat(x[0][..., None], 3, axis=2) if x.shape[0] == 1 else x.transpose(1, 2, 0)


def enlarge(rgb: np.ndarray, target: int = 112) -> tuple[Image.Image, int]:
    """Small images (MNIST) scaled up by a whole factor, nearest neighbour, so boxes stay on pixels."""
    scale = max(1, target // max(rgb.shape[:2]))
    img = Image.fromarray(rgb)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST), scale


def draw_box(img: Image.Image, box: tuple[int, int, int, int], scale: int, colour=(255, 255, 0)) -> Image.Image:
    y0, y1, x0, x1 = box
    ImageDraw.Draw(img).rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], outline=colour,
                                  width=max(1, scale // 2))
    return img


@torch.no_grad()
def prototype_pictures(model: ProtoPNet, j: int, source: torch.Tensor, mean=None, std=None) -> dict[str, Image.Image]:
    """Prototype j's pictures from its source image [C, H, W]: the receptive-field patch, the source
    image with the patch box (yellow) and high-activation box (red), and the activation overlay."""
    rgb = to_rgb_array(source, mean, std)
    y0, y1, x0, x1 = model.push_rf_box[j].tolist()
    patch, _ = enlarge(np.ascontiguousarray(rgb[y0:y1, x0:x1]), target=56)
    boxed, scale = enlarge(rgb)
    draw_box(boxed, tuple(model.push_rf_box[j].tolist()), scale)
    draw_box(boxed, tuple(model.push_activation_box[j].tolist()), scale, colour=(255, 0, 0))
    x = source[None].to(model.prototypes.device)
    sim = similarity(squared_distance_maps(model.latent(x), model.prototypes[j:j + 1]))[0, 0]
    heat, _ = enlarge(overlay_heat(rgb, upsample(sim, rgb.shape[0])))
    return {"patch": patch, "source": boxed, "activation": heat}


def write_push_pictures(model: ProtoPNet, source_images, out_dir: Path, mean=None, std=None) -> list[Path]:
    """<out_dir>/<j>_patch.png, <j>_source.png, <j>_activation.png for every pushed prototype."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for j in range(model.prototypes.shape[0]):
        index = int(model.push_source[j, 0])
        if index < 0:
            continue
        for kind, img in prototype_pictures(model, j, source_images(index), mean, std).items():
            path = out_dir / f"{j:03d}_{kind}.png"
            img.save(path)
            written.append(path)
    return written


class UnpushedPrototypes(FamilyError):
    """A ProtoPNet checkpoint whose prototypes were not all pushed onto training patches."""


@torch.no_grad()
def pushed_prototype_records(model: ProtoPNet, push_set, mean=None, std=None) -> list[PrototypeRecord]:
    """Per pushed prototype: the patch, its source image with the receptive-field box (yellow) and the
    high-activation box (red), the activation map; the push provenance (ProtoPNet's bundle records)."""
    unpushed = (model.push_source[:, 0] < 0).nonzero().flatten().tolist()
    if unpushed:
        raise UnpushedPrototypes(f"prototypes {unpushed[:5]} were never pushed; export a checkpoint written "
                                 "after a push")
    W = model.last_layer.weight.detach()  # [K, M]
    identities = model.class_identities()
    overlaps = object_overlaps(model, push_set.images)  # None each without a segmentation mask
    records = []
    for j in range(model.prototypes.shape[0]):
        index, row, col = model.push_source[j].tolist()
        boxes = {name: dict(zip(("y0", "y1", "x0", "x1"), box[j].tolist(), strict=True))
                 for name, box in (("receptive_field_box", model.push_rf_box),
                                   ("activation_box", model.push_activation_box))}
        provenance = {"push_set": "train split (unaugmented)", "source_index": index,
                      "source_label": int(push_set.labels[index]), "patch": {"row": row, "col": col}, **boxes}
        if overlaps[j] is not None:  # the fraction of the activation box on the object (CUB masks)
            provenance["activation_box_on_object"] = overlaps[j]
        records.append(PrototypeRecord(class_identity=identities[j], weights=W[:, j].tolist(),
                                       pictures=prototype_pictures(model, j, push_set.images[index], mean, std),
                                       provenance=provenance))
    return records
