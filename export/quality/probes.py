"""What the quality measures need from a model (torch): the model rebuilt from a bundle's graph,
similarity maps, object masks, noise, randomisation, and pixel deletion / insertion runs.

The model is rebuilt from model.onnx itself (every parameter is an initializer under its
state_dict name, see export/onnx_export.py), so a report describes exactly the graph the bundle
serves, and needs the bundle alone; the rebuilt model must reproduce the golden probe.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from export.bundle import Bundle, BundleError
from export.onnx_export import classifier_graph, classifier_outputs
from export.runtime import load_probe
from training.checkpoint import build_model
from training.config import Config
from training.protopnet import ProtoPNet
from training.prototypedl import PrototypeDL

BATCH = 500
INK = 0.0  # a grey-level digit's own pixels: those with any ink (as Decoy-MNIST's object masks)


def model_from_bundle(bundle: Bundle, restore=None) -> PrototypeDL | ProtoPNet:
    """The torch model whose weights are model.onnx's initializers, checked against the golden probe;
    `restore(model, bundle)` puts back what the graph does not hold (ProtoPNet's push sources)."""
    config = Config.from_dict(bundle.manifest.training.config, source=f"{bundle.path}: training config")
    model = build_model(config, initial_weights=False)
    graph = onnx.load(str(bundle.model_path)).graph
    state = {init.name.removeprefix("model."): torch.from_numpy(numpy_helper.to_array(init).copy())
             for init in graph.initializer if init.name.startswith("model.")}
    needed = [k for k, _ in model.named_parameters()] + [k for k, _ in model.named_buffers()
                                                          if k.endswith(("running_mean", "running_var"))]
    missing = [k for k in needed if k not in state]
    if missing:
        raise BundleError(f"{bundle.model_path}: no initializer for {sorted(missing)[:3]}; cannot rebuild the model")
    model.load_state_dict(state, strict=False)  # buffers the forward pass does not read are not in the graph
    if restore is not None:
        restore(model, bundle)
    model.eval()
    probe = load_probe(bundle)
    with torch.no_grad():
        logits = classifier_graph(model)(torch.from_numpy(probe["input.image"].astype(np.float32)))[0]
    if not np.allclose(torch.softmax(logits, 1).numpy(), probe["output.probabilities"], atol=1e-4, rtol=1e-3):
        raise BundleError(f"{bundle.model_path}: the model rebuilt from its initializers misses the golden probe")
    return model


def restore_push_sources(model: ProtoPNet, bundle: Bundle) -> None:
    """ProtoPNet: each prototype's push source (image index, patch row and column) from its provenance."""
    for j, row in enumerate(bundle.manifest.prototypes):
        provenance = row.provenance or {}
        if "source_index" in provenance:
            patch = provenance["patch"]
            model.push_source[j] = torch.tensor([provenance["source_index"], patch["row"], patch["col"]])


@torch.no_grad()
def protopnet_maps(model: ProtoPNet, images: torch.Tensor) -> torch.Tensor:
    """Similarity maps [N, M, h, w] (the exported graph's exact distances)."""
    return torch.cat([model(images[i:i + BATCH], exact=True).similarity_maps for i in range(0, len(images), BATCH)])


def upsampled(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """[N, M, h, w] -> [N, M, H, W] by bicubic interpolation: the push pictures' and /explain's heatmaps."""
    return F.interpolate(maps.float(), size=size, mode="bicubic", align_corners=False).numpy()


@torch.no_grad()
def distances(model: PrototypeDL | ProtoPNet, images: torch.Tensor) -> np.ndarray:
    """[N, M]: the exported graph's `distances` output (ProtoPNet: the nearest patch's), in batches."""
    graph = classifier_graph(model).eval()
    at = classifier_outputs(model).index("distances")
    return torch.cat([graph(images[i:i + BATCH])[at] for i in range(0, len(images), BATCH)]).numpy()


@torch.no_grad()
def prototypedl_encodings(model: PrototypeDL, images: torch.Tensor) -> np.ndarray:
    return torch.cat([model.encode(images[i:i + BATCH]) for i in range(0, len(images), BATCH)]).numpy()


@torch.no_grad()
def patch_encodings(model: ProtoPNet, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Every latent patch of `images`: [N * h * w, D] and the image each comes from [N * h * w]."""
    z = torch.cat([model.latent(images[i:i + BATCH]) for i in range(0, len(images), BATCH)])  # [N, D, h, w]
    n, d = z.shape[:2]
    patches = z.permute(0, 2, 3, 1).reshape(-1, d).numpy()
    return patches, np.repeat(np.arange(n), z.shape[2] * z.shape[3])


def object_masks(split, index: np.ndarray, images: torch.Tensor, dataset: str) -> dict[str, np.ndarray]:
    """Named bool masks [n, H, W] of the sampled images: the split's own `masks` (a dict of name ->
    [N, H, W], e.g. a decoy data set's object and decoy masks), else a folder's segmentations
    (`images.mask(i)`, CUB layout), else, for grey-level digits, the pixels with ink."""
    own = getattr(split, "masks", None)
    if own:
        return {name: np.asarray(m)[index].astype(bool) for name, m in own.items()}
    mask_of = getattr(split.images, "mask", None)
    if mask_of is not None:
        found = [mask_of(int(i)) for i in index]
        if any(m is None for m in found):
            return {}
        return {"object": np.stack(found)}
    if dataset in ("mnist", "fashion_mnist"):
        return {"object": images[:, 0].numpy() > INK}
    return {}


def input_noise(images: torch.Tensor, sigma: float, std: list[float], seed: int) -> torch.Tensor:
    """Gaussian pixel noise of `sigma` (in pixel units, so divided by the input's std per channel)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator) * sigma
    return images + noise / torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)


def randomised_backbone(model: ProtoPNet, seed: int) -> ProtoPNet:
    """A copy whose backbone weights are re-initialised (Adebayo et al.'s model parameter
    randomisation); add-on layers, prototypes and last layer stay as trained."""
    other = copy.deepcopy(model)
    torch.manual_seed(seed)
    for module in other.features.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return other.eval()


def random_model(bundle: Bundle, seed: int) -> PrototypeDL | ProtoPNet:
    """A freshly initialised model of the bundle's architecture (the untrained reference)."""
    config = Config.from_dict(bundle.manifest.training.config, source=f"{bundle.path}: training config")
    torch.manual_seed(seed)
    return build_model(config, initial_weights=False).eval()


@torch.no_grad()
def ordered_pixel_runs(model: ProtoPNet, image: torch.Tensor, prototype: int, order: np.ndarray,
                       steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion curves [steps + 1] of one prototype's similarity on one image [C, H, W],
    removing (deletion) or adding to a blank input (insertion) pixels in `order`, as a share of its
    similarity on the whole image. The blank is the input's zero: black for raw pixels, the mean
    colour for normalised ones."""
    c, h, w = image.shape
    counts = np.linspace(0, h * w, steps + 1).round().astype(int)
    shown = np.zeros((steps + 1, h * w), dtype=bool)
    for t, k in enumerate(counts):
        shown[t, order[:k]] = True
    shown = torch.from_numpy(shown).view(steps + 1, 1, h, w)
    deleted = image[None] * (~shown)
    inserted = image[None] * shown
    full = model(image[None], exact=True).similarities[0, prototype]
    out = model(torch.cat([deleted, inserted]), exact=True).similarities[:, prototype] / full
    return out[:steps + 1].numpy(), out[steps + 1:].numpy()
