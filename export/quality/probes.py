"""What the quality measures need from a model (torch): the model rebuilt from a bundle's graph, the
graph's outputs by name, encodings, object masks, noise, randomisation, pixel deletion / insertion.

The model is rebuilt from model.onnx itself (every parameter is an initializer under its
state_dict name, see export/onnx_export.py), so a report describes exactly the graph the bundle
serves, and needs the bundle alone; the rebuilt model must reproduce the golden probe. Everything
here reads the exported forward pass (classifier_graph) by output name, so what a family has
(similarity maps, a decoder) decides which figures apply, not its name.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

from bundle.manifest import Bundle, BundleError
from bundle.runtime import load_probe
from export.onnx_export import classifier_graph, classifier_outputs, decoder_graph
from protoserve.similarity import similarity
from training import datasets
from training.checkpoint import build_model
from training.config import Config
from training.families import family_of

BATCH = 500
INK = 0.0  # a grey-level digit's own pixels: those with any ink (as Decoy-MNIST's object masks)


def model_from_bundle(bundle: Bundle) -> nn.Module:
    """The torch model whose weights are model.onnx's initializers, checked against the golden probe."""
    model = build_model(bundle_config(bundle), initial_weights=False)
    graph = onnx.load(str(bundle.model_path)).graph
    state = {init.name.removeprefix("model."): torch.from_numpy(numpy_helper.to_array(init).copy())
             for init in graph.initializer if init.name.startswith("model.")}
    needed = [k for k, _ in model.named_parameters()] + [k for k, _ in model.named_buffers()
                                                          if k.endswith(("running_mean", "running_var"))]
    missing = [k for k in needed if k not in state]
    if missing:
        raise BundleError(f"{bundle.model_path}: no initializer for {sorted(missing)[:3]}; cannot rebuild the model")
    model.load_state_dict(state, strict=False)  # buffers the forward pass does not read are not in the graph
    model.eval()
    probe = load_probe(bundle)
    logits = outputs(model, torch.from_numpy(probe["input.image"].astype(np.float32)), "logits")
    if not np.allclose(torch.softmax(logits, 1).numpy(), probe["output.probabilities"], atol=1e-4, rtol=1e-3):
        raise BundleError(f"{bundle.model_path}: the model rebuilt from its initializers misses the golden probe")
    return model


def bundle_config(bundle: Bundle) -> Config:
    """The training config the bundle's manifest carries (it names the architecture)."""
    return Config.from_dict(bundle.manifest.training.config, source=f"{bundle.path}: training config")


@torch.no_grad()
def outputs(model: nn.Module, images: torch.Tensor, name: str) -> torch.Tensor:
    """One output of the exported forward pass (model.onnx's names) for `images`, in batches."""
    graph = classifier_graph(model).eval()
    at = classifier_outputs(model).index(name)
    return torch.cat([graph(images[i:i + BATCH])[at] for i in range(0, len(images), BATCH)])


def has_output(model: nn.Module, name: str) -> bool:
    """Whether the model's exported graph has the output `name` (e.g. similarity_maps)."""
    return name in classifier_outputs(model)


def upsampled(maps: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """[N, M, h, w] -> [N, M, H, W] by bicubic interpolation: the push pictures' and /explain's heatmaps."""
    return F.interpolate(maps.float(), size=size, mode="bicubic", align_corners=False).numpy()


@torch.no_grad()
def encodings(model: nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The latent vectors the prototypes are compared with, [N * P, D], and the image each comes from."""
    encode = family_of(model).encode
    z = torch.cat([encode(model, images[i:i + BATCH]) for i in range(0, len(images), BATCH)])  # [N, P, D]
    return z.reshape(-1, z.shape[2]).numpy(), np.repeat(np.arange(len(z)), z.shape[1])


@torch.no_grad()
def decoded_prototypes(model: nn.Module) -> np.ndarray | None:
    """The prototypes through the model's decoder [M, C, H, W] (model input space), None without one."""
    decoder = decoder_graph(model)
    return None if decoder is None else decoder(model.prototypes).numpy()


def object_masks(split, index: np.ndarray, images: torch.Tensor, dataset: str) -> dict[str, np.ndarray]:
    """Named bool masks [n, H, W] of the sampled images: the split's own `masks` (a dict of name ->
    [N, H, W], e.g. a decoy data set's object and decoy masks), else a folder's segmentations
    (`images.mask(i)`, CUB layout), else, where the data set's objects are ink (grey-level digits,
    training/datasets.py), the pixels with ink."""
    own = getattr(split, "masks", None)
    if own:
        return {name: np.asarray(m)[index].astype(bool) for name, m in own.items()}
    mask_of = getattr(split.images, "mask", None)
    if mask_of is not None:
        found = [mask_of(int(i)) for i in index]
        if any(m is None for m in found):
            return {}
        return {"object": np.stack(found)}
    if datasets.dataset(dataset).ink_masks:
        return {"object": images[:, 0].numpy() > INK}
    return {}


def input_noise(images: torch.Tensor, sigma: float, std: list[float], seed: int) -> torch.Tensor:
    """Gaussian pixel noise of `sigma` (in pixel units, so divided by the input's std per channel)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator) * sigma
    return images + noise / torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)


def randomised_backbone(model: nn.Module, seed: int) -> nn.Module:
    """A copy whose backbone weights are re-initialised (Adebayo et al.'s model parameter
    randomisation); what follows the backbone (add-on layers, prototypes, last layer) stays as trained."""
    other = copy.deepcopy(model)
    torch.manual_seed(seed)
    for module in family_of(other).backbone(other).modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return other.eval()


def random_model(bundle: Bundle, seed: int) -> nn.Module:
    """A freshly initialised model of the bundle's architecture (the untrained reference)."""
    torch.manual_seed(seed)
    return build_model(bundle_config(bundle), initial_weights=False).eval()


@torch.no_grad()
def ordered_pixel_runs(model: nn.Module, image: torch.Tensor, prototype: int, order: np.ndarray,
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
    batch = torch.cat([image[None], image[None] * (~shown), image[None] * shown])
    s = similarity(outputs(model, batch, "distances")[:, prototype])
    return (s[1:steps + 2] / s[0]).numpy(), (s[steps + 2:] / s[0]).numpy()
