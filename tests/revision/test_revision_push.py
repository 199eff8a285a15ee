"""Push during revision: never onto a patch the antitypes stand for (nearer to an antitype than to
every prototype); the next allowed patch instead, and the nearest one where none is allowed."""

from __future__ import annotations

import torch

from training.config import Config
from training.protopnet import ProtoPNet
from training.push import push_prototypes


def _model_and_patches():
    torch.manual_seed(0)
    model = ProtoPNet(Config.from_dict({"model": {"family": "protopnet", "n_prototypes": 10,
                                                  "prototype_dim": 8}}).model).double().eval()
    torch.manual_seed(1)
    images = torch.rand(12, 1, 28, 28, dtype=torch.float64)  # an untrained model's patches lie close together
    labels = torch.arange(12) % 10  # class 0: images 0 and 10
    with torch.no_grad():
        z = model.latent(images)  # [12, D, h, w]
    own = z[[0, 10]].permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # class 0's patches, image-major, row-major
    return model, images, labels, z, own


def _sources(row: int, h: int) -> tuple[int, int, int]:
    image, pos = divmod(row, h * h)
    return (0, 10)[image], pos // h, pos % h


def test_push_skips_the_antitype_like_nearest_patch_for_the_next_allowed_one():
    model, images, labels, z, own = _model_and_patches()
    h = z.shape[-1]
    j = model.class_identities().index(0)
    rejected = own[5]  # an antitype: the patch a user rejected
    nudge = own[17] - rejected  # the prototype has moved a little away from it, towards patch 17
    prototype = rejected + 0.05 * nudge
    with torch.no_grad():
        model.prototypes[j, :, 0, 0] = prototype
    everyone = model.prototypes.detach().view(10, -1)
    d_p = ((own - prototype) ** 2).sum(1)
    d_q = ((own - rejected) ** 2).sum(1)
    nearest = int(d_p.argmin())
    allowed = d_q >= torch.cdist(own, everyone).pow(2).amin(1)  # the rule by hand: not nearer to the antitype
    assert not allowed[5] and not allowed[nearest]  # unrestricted, push would land on an antitype-like patch
    expected = int(torch.where(allowed, d_p, torch.inf).argmin())
    assert expected not in (5, nearest) and bool(allowed[expected])
    result = push_prototypes(model, images, labels, antitypes=rejected[None])
    assert tuple(model.push_source[j].tolist()) == _sources(expected, h)
    torch.testing.assert_close(model.prototypes[j, :, 0, 0], own[expected])
    assert not bool(result.fallback[j])
    with torch.no_grad():  # the same prototype without antitypes: onto the antitype-like patch
        model.prototypes[j, :, 0, 0] = prototype
    push_prototypes(model, images, labels)
    assert tuple(model.push_source[j].tolist()) == _sources(nearest, h)


def test_push_falls_back_to_the_nearest_patch_when_every_patch_is_antitype_like():
    model, images, labels, z, own = _model_and_patches()
    h = z.shape[-1]
    j = model.class_identities().index(0)
    centre = own.mean(0)
    prototype = centre + 50.0
    with torch.no_grad():
        model.prototypes += 50.0  # every prototype far outside the latent cube: every patch is nearer to
        model.prototypes[j, :, 0, 0] = prototype  # the antitype than to any prototype
    result = push_prototypes(model, images, labels, antitypes=centre[None])
    assert bool(result.fallback[j])
    nearest = int(((own - prototype) ** 2).sum(1).argmin())
    assert tuple(model.push_source[j].tolist()) == _sources(nearest, h)
