"""What interactive revision needs to know about each model family: one RevisionFamily per family,
looked up by the name of its entry in the training family table (training/families.py).

ProtoPNet: a prototype is a patch vector [D, 1, 1], pushed onto its nearest own-class patch; the
last layer reads similarities; the encoder is the backbone plus the add-on layers.
PrototypeDL: a prototype is a whole latent vector [q], shown through the decoder and never
pushed; the last layer reads distances. With the encoder trained, the decoder stays frozen: it
draws the pictures a person (or the simulated user) judged, and a decoder that kept training would
change what a rejected picture means, and could paint the square back into a prototype that had
moved away from its antitype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from revision.simulated_user import (
    Judgement,
    box_judgements,
    clean_reference,
    decoded_judgements,
)
from training.families import FamilyError, family_of
from training.protopnet import ProtoPNet, protopnet_loss
from training.prototypedl import PrototypeDL, class_identities, prototypedl_loss
from training.push import push_prototypes, write_push_pictures


@dataclass
class ObjectMasks:
    """What the simulated user knows about the push set (the training split), index-aligned."""

    object_masks: np.ndarray  # bool [N, H, W]: the object (the digit's ink)
    decoy_masks: np.ndarray | None  # bool [N, H, W]: the confounder, where there is one
    clean_images: np.ndarray  # float [N, H, W] in [0, 1], confounders removed
    labels: np.ndarray  # int [N]
    decoy_size: int = 4

    @classmethod
    def from_decoy(cls, ds, decoy_size: int = 4) -> ObjectMasks:
        """From a training/decoy_mnist.DecoySet (the digit's ink, the square, the digit without it)."""
        clean = np.where(ds.decoy_masks, 0, ds.images).astype(np.float32) / 255.0
        return cls(ds.object_masks, ds.decoy_masks, clean, ds.labels, decoy_size)

    @classmethod
    def from_split(cls, split, decoy_size: int = 4) -> ObjectMasks:
        """Plain MNIST-like data (no confounder): the object is every pixel with ink."""
        images = split.images[:, 0].numpy()
        return cls(images > 0, None, images, split.labels.numpy(), decoy_size)


@dataclass(frozen=True)
class RevisionFamily:
    head_inputs: Callable  # (model, x) -> [N, M] what the last layer reads
    loss: Callable  # (model, x, y, loss_cfg) -> (total, {name: float})
    last_layer_penalty: Callable  # (model, loss_cfg) -> (weight -> tensor) or None
    encoder_modules: Callable  # model -> modules trained with the encoder (frozen together)
    push: Callable  # (model, images, labels, antitypes [S, D]) -> ids with no patch clear of the antitypes
    sources: Callable  # model -> per prototype, the training patch it stands for (JSON-able), or None
    encode_sources: Callable  # (model, train images, [source]) -> [S, D] those under the current encoder
    judge: Callable  # (model, ObjectMasks) -> list[Judgement]
    class_identities: Callable  # model -> list[int]
    pictures: Callable  # (model, train Split, out_dir) -> {prototype id: [PNG paths]} for a person to judge
    # Push puts each prototype onto a training patch of its own class: the training images must hold every
    # class a prototype stands for.
    pushes_onto_own_class: bool = False


def _protopnet_loss(model: ProtoPNet, x, y, cfg):
    terms = protopnet_loss(model(x), y, model, cfg)
    return terms.total, terms.as_floats()


def _prototypedl_loss(model: PrototypeDL, x, y, cfg):
    terms = prototypedl_loss(model(x), x, y, cfg)
    return terms.total, terms.as_floats()


def _protopnet_penalty(model: ProtoPNet, cfg):
    wrong = 1 - model.prototype_class_identity.T  # [K, M]
    return lambda weight: cfg.lambda_l1 * (weight * wrong).abs().sum()


def _protopnet_push(model: ProtoPNet, images, labels, antitypes=None) -> list[int]:
    result = push_prototypes(model, images, labels, antitypes=antitypes)
    return [] if result.fallback is None else result.fallback.nonzero().flatten().tolist()


def _in_eval_mode(encode: Callable) -> Callable:
    """encode(model, ...) with batch-norm in evaluation mode and no gradient; every module's mode is
    restored one by one afterwards (a frozen encoder stays in evaluation mode during training)."""

    @torch.no_grad()
    def wrapped(model, *args):
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            return encode(model, *args)
        finally:
            for module, training in modes:
                module.training = training

    return wrapped


@_in_eval_mode
def _protopnet_encode_sources(model: ProtoPNet, images, sources: list) -> torch.Tensor:
    """The latent patches at sources [(image index, row, col)] of the push set."""
    at = torch.tensor(sources, dtype=torch.long)
    unique, where = at[:, 0].unique(return_inverse=True)
    z = model.latent(images[unique].to(model.prototypes.device))  # [U, D, h, w]
    return z[where.to(z.device), :, at[:, 1].to(z.device), at[:, 2].to(z.device)]




def _protopnet_judge(model: ProtoPNet, masks: ObjectMasks) -> list[Judgement]:
    return box_judgements(model.push_activation_box.cpu().numpy(), model.push_source[:, 0].cpu().numpy(),
                          masks.object_masks, masks.decoy_masks)


@torch.no_grad()
def decoded_prototypes(model: PrototypeDL) -> np.ndarray:
    """[m, H, W] the decoder's pictures of the prototypes (first channel), in [0, 1]."""
    return model.decode(model.prototypes).clamp(0, 1)[:, 0].cpu().numpy()


@torch.no_grad()
def clean_reconstructions(model: PrototypeDL, clean_images: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """[N, H, W] the model's own pictures of the clean images (its decoder's haze included)."""
    was = model.training
    model.eval()
    device = model.prototypes.device
    x = torch.from_numpy(clean_images[:, None].astype(np.float32))
    parts = [model.decode(model.encode(x[i:i + batch_size].to(device)))[:, 0].cpu().numpy()
             for i in range(0, len(x), batch_size)]
    model.train(was)
    return np.concatenate(parts)


def _prototypedl_judge(model: PrototypeDL, masks: ObjectMasks) -> list[Judgement]:
    reference = clean_reference(clean_reconstructions(model, masks.clean_images), masks.labels, model.cfg.n_classes,
                                masks.decoy_size)
    return decoded_judgements(decoded_prototypes(model), _prototypedl_identities(model), reference,
                              masks.decoy_size)


def _protopnet_pictures(model: ProtoPNet, train, out_dir: Path) -> dict[int, list[Path]]:
    written = write_push_pictures(model, lambda i: train.images[i], out_dir)
    pictures: dict[int, list[Path]] = {}
    for path in written:
        pictures.setdefault(int(path.name.split("_")[0]), []).append(path)
    return pictures


def _prototypedl_pictures(model: PrototypeDL, train, out_dir: Path) -> dict[int, list[Path]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    pictures = {}
    for j, picture in enumerate(decoded_prototypes(model)):
        path = out_dir / f"{j:03d}_decoded.png"
        Image.fromarray((picture * 255).round().astype(np.uint8)).resize((112, 112), Image.NEAREST).save(path)
        pictures[j] = [path]
    return pictures


def _prototypedl_identities(model: PrototypeDL) -> list[int]:
    return class_identities(model.last_layer.weight.detach())


PROTOPNET_REVISION = RevisionFamily(
    head_inputs=lambda model, x: model(x).similarities,
    loss=_protopnet_loss,
    last_layer_penalty=_protopnet_penalty,
    encoder_modules=lambda model: [model.features, model.add_on],
    push=_protopnet_push,
    sources=lambda model: model.push_source.detach().cpu().tolist(),
    encode_sources=_protopnet_encode_sources,
    judge=_protopnet_judge,
    class_identities=lambda model: model.class_identities(),
    pictures=_protopnet_pictures,
    pushes_onto_own_class=True,
)

PROTOTYPEDL_REVISION = RevisionFamily(
    head_inputs=lambda model, x: model(x).distances,
    loss=_prototypedl_loss,
    last_layer_penalty=lambda model, cfg: None,
    encoder_modules=lambda model: [model.encoder],  # the decoder stays frozen (module docstring)
    push=lambda model, images, labels, antitypes=None: [],
    # A prototype is a whole latent vector, not a training patch; its decoded picture re-encoded lands
    # far from it (the autoencoder does not map a prototype back onto itself), so the antitype stays
    # the rejected vector.
    sources=lambda model: None,
    encode_sources=None,
    judge=_prototypedl_judge,
    class_identities=_prototypedl_identities,
    pictures=_prototypedl_pictures,
)


REVISION_FAMILIES: dict[str, RevisionFamily] = {"protopnet": PROTOPNET_REVISION, "prototypedl": PROTOTYPEDL_REVISION}


def revision_family(model) -> RevisionFamily:
    """The revision hooks of a built model's family (its entry in training/families.py)."""
    return revision_family_named(family_of(model).name)


def revision_family_named(name: str) -> RevisionFamily:
    """The revision hooks of the training family called `name`; a family without hooks is refused."""
    if name not in REVISION_FAMILIES:
        raise FamilyError(f"family {name!r} has no revision hooks (revision/families.py REVISION_FAMILIES)")
    return REVISION_FAMILIES[name]

