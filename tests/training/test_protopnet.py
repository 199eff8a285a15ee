"""ProtoPNet: distances as convolutions, the minimum over positions, last-layer init, loss terms, push."""

from __future__ import annotations

import pytest
import torch

from protoserve.similarity import EPSILON
from training.config import Config, ConfigError, LossConfig
from training.protopnet import ProtoPNet, masked_min, protopnet_loss, similarity, squared_distance_maps
from training.push import activation_box, push_prototypes, write_push_pictures


def small_model(**model) -> ProtoPNet:
    torch.manual_seed(0)
    cfg = {"family": "protopnet", "n_prototypes": 20, "prototype_dim": 8, **model}
    return ProtoPNet(Config.from_dict({"model": cfg}).model)


def test_distance_maps_as_convolution_equal_the_direct_computation():
    z = torch.rand(3, 8, 5, 6, dtype=torch.float64)
    p = torch.rand(7, 8, 1, 1, dtype=torch.float64)
    direct = ((z[:, None] - p.view(1, 7, 8, 1, 1)) ** 2).sum(dim=2)  # [N, M, h, w]
    torch.testing.assert_close(squared_distance_maps(z, p), direct, rtol=1e-10, atol=1e-12)
    p[2, :, 0, 0] = z[1, :, 3, 4]  # a prototype equal to a patch is at distance 0 there
    assert squared_distance_maps(z, p)[1, 2, 3, 4].abs() < 1e-12


def test_forward_shapes_minimum_over_positions_and_similarity():
    model = small_model().eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        out = model(x)
        z = model.latent(x)
    assert out.distance_maps.shape == out.similarity_maps.shape == (4, 20, 7, 7)
    assert out.distances.shape == out.similarities.shape == (4, 20) and out.logits.shape == (4, 10)
    direct = ((z[:, None] - model.prototypes.view(1, 20, 8, 1, 1)) ** 2).sum(dim=2)
    torch.testing.assert_close(out.distances, direct.flatten(2).min(dim=2).values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.similarities, torch.log((out.distances + 1) / (out.distances + EPSILON)))
    torch.testing.assert_close(out.similarities, out.similarity_maps.flatten(2).max(dim=2).values)
    torch.testing.assert_close(out.logits, out.similarities @ model.last_layer.weight.T)
    assert similarity(torch.tensor(0.0)) > similarity(torch.tensor(1.0)) > 0  # nearer is more similar


def test_last_layer_starts_at_plus_one_and_minus_half():
    model = small_model()
    W = model.last_layer.weight  # [K, M]
    assert model.class_identities() == [j // 2 for j in range(20)]
    for k in range(10):
        for j in range(20):
            assert W[k, j] == (1.0 if j // 2 == k else -0.5)


def test_loss_terms_signs_and_masks():
    model = small_model()
    # Two images of classes 0 and 3; prototypes 0, 1 stand for class 0 and 6, 7 for class 3.
    d = torch.full((2, 20), 5.0)
    d[0, 1], d[0, 6] = 0.5, 0.1  # image 0: nearest own-class 0.5, nearest other-class 0.1
    d[1, 7], d[1, 2] = 2.0, 3.0  # image 1: nearest own-class 2.0, nearest other-class 3.0
    sim = similarity(d)
    out = type("Out", (), {"distances": d, "logits": model.last_layer(sim)})()
    y = torch.tensor([0, 3])
    cfg = LossConfig()
    terms = protopnet_loss(out, y, model, cfg)
    assert terms.cluster_cost.item() == pytest.approx((0.5 + 2.0) / 2)
    assert terms.separation_cost.item() == pytest.approx((0.1 + 3.0) / 2)
    assert terms.l1.item() == pytest.approx(0.5 * 9 * 20)  # only the wrong-class weights count
    expected = (terms.cross_entropy + 0.8 * terms.cluster_cost - 0.08 * terms.separation_cost + 1e-4 * terms.l1)
    assert terms.total.item() == pytest.approx(expected.item())
    # Signs: moving an image nearer its own prototypes lowers the loss; nearer other classes raises it.
    d_own = d.clone()
    d_own[0, 1] = 0.2
    d_other = d.clone()
    d_other[1, 2] = 2.5
    lower = protopnet_loss(type("Out", (), {"distances": d_own, "logits": model.last_layer(similarity(d_own))})(),
                           y, model, cfg)
    higher = protopnet_loss(type("Out", (), {"distances": d_other,
                                             "logits": model.last_layer(similarity(d_other))})(), y, model, cfg)
    assert lower.total < terms.total < higher.total
    with torch.no_grad():
        model.last_layer.weight[0, 0] = 7.0  # a right-class weight: no L1 change
    assert protopnet_loss(out, y, model, cfg).l1.item() == pytest.approx(terms.l1.item())


def test_masked_min_ignores_masked_columns():
    d = torch.tensor([[1.0, 0.1, 3.0]])
    assert masked_min(d, torch.tensor([[True, False, True]])).item() == 1.0


def test_protopnet_config_is_checked():
    with pytest.raises(ConfigError, match="multiple of n_classes"):
        Config.from_dict({"model": {"family": "protopnet", "n_prototypes": 15}})
    with pytest.raises(ConfigError, match="model.backbone"):
        Config.from_dict({"model": {"family": "protopnet", "n_prototypes": 10, "backbone": "alexnet"}})
    assert Config.from_dict({}).model.family == "prototypedl"  # PrototypeDL configs are unchanged


def test_push_projects_onto_own_class_patches_at_distance_zero(tmp_path):
    model = small_model()
    torch.manual_seed(1)
    images = torch.rand(40, 1, 28, 28)
    labels = torch.arange(40) % 10
    before = model.prototypes.detach().clone()
    result = push_prototypes(model, images, labels, batch_size=16)
    assert not torch.equal(before, model.prototypes)
    identity = model.class_identities()
    model.eval()
    with torch.no_grad():
        for j in range(20):
            index, row, col = model.push_source[j].tolist()
            assert labels[index] == identity[j]  # pushed onto an image of its own class
            z = model.latent(images[index:index + 1])
            patch = z[0, :, row, col]
            assert torch.equal(model.prototypes[j, :, 0, 0], result.vectors[j])
            assert ((patch - model.prototypes[j, :, 0, 0]) ** 2).sum() < 1e-10  # distance zero, directly
            assert model(images[index:index + 1]).distance_maps[0, j, row, col] < 1e-5  # and in the model
            # The chosen patch is the nearest own-class patch to the old prototype.
            own = labels == identity[j]
            zs = model.latent(images[own])
            old = before[j].view(1, -1, 1, 1)
            assert result.distances[j] == pytest.approx(((zs - old) ** 2).sum(1).min().item(), rel=1e-4, abs=1e-5)
            assert tuple(model.push_rf_box[j].tolist()) == model.rf.box(row, col)
            y0, y1, x0, x1 = model.push_activation_box[j].tolist()
            assert 0 <= y0 < y1 <= 28 and 0 <= x0 < x1 <= 28
    written = write_push_pictures(model, lambda i: images[i], tmp_path)
    assert len(written) == 60 and all(p.stat().st_size > 0 for p in written)


def test_activation_box_covers_the_peak():
    sim = torch.zeros(7, 7)
    sim[2, 5] = 10.0
    y0, y1, x0, x1 = activation_box(sim, 28)
    assert y0 <= 2 * 4 + 2 < y1 and x0 <= 5 * 4 + 2 < x1
    assert (y1 - y0) * (x1 - x0) <= 0.2 * 28 * 28
