"""The quality measures against constructed cases whose values are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from export.quality import measures, probes


def test_a_prototype_that_fires_only_on_its_class_has_auroc_1():
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    fires = np.where(labels == 1, 5.0, 0.1)[:, None]  # one prototype of class 1
    assert measures.class_discrimination(fires, labels, [1]) == [1.0]
    assert measures.auroc(-fires[:, 0], labels == 1) == 0.0  # fires everywhere but its class
    assert measures.auroc(np.ones(7), labels == 1) == 0.5  # fires the same everywhere: chance
    assert measures.auroc(np.arange(3.0), np.array([True, True, True])) is None  # no negatives


def test_auroc_with_ties_matches_the_pairwise_count():
    rng = np.random.default_rng(0)
    scores, positive = rng.integers(0, 4, 60).astype(float), rng.random(60) < 0.4
    pos, neg = scores[positive], scores[~positive]
    pairwise = ((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean()
    assert measures.auroc(scores, positive) == pytest.approx(pairwise)


def test_average_ranks_match_scipy():
    from scipy.stats import rankdata

    values = np.random.default_rng(1).integers(0, 5, 40).astype(float)
    np.testing.assert_allclose(measures.average_ranks(values), rankdata(values))


def test_two_prototypes_on_one_patch_are_duplicates():
    sources = [(4, 1, 2), (7, 0, 0), (4, 1, 2), None, (4, 1, 3)]
    assert measures.same_patch_groups(sources) == [[0, 2]]
    vectors = np.array([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0 + 1e-4], [5.0, 5.0]])
    assert [(i, j) for i, j, _ in measures.near_duplicate_pairs(vectors, threshold=0.01)] == [(1, 2)]


def test_nearest_neighbours_skip_encodings_of_the_same_group():
    encodings = np.array([[0.0], [0.1], [1.0], [3.0]])
    np.testing.assert_allclose(measures.nearest_neighbour_distances(encodings), [0.01, 0.01, 0.81, 4.0])
    np.testing.assert_allclose(measures.nearest_neighbour_distances(encodings, np.array([0, 0, 1, 1]), chunk=1),
                               [1.0, 0.81, 0.81, 8.41])


def test_the_last_layer_uses_prototypes_with_a_weight_that_can_move_a_logit():
    weights = np.array([[1.0, 0.0, -0.5, 1e-5], [0.0, 0.0, 0.2, 0.0]])
    used = measures.used_by_last_layer(weights, active=np.array([True, True, False, True]))
    assert used.tolist() == [True, False, False, False]  # zero column, masked, negligible


def test_an_activation_wholly_inside_the_mask_has_precision_1():
    mask = np.zeros((20, 20), dtype=bool)
    mask[5:12, 5:12] = True
    inside = np.zeros((20, 20))
    inside[6:10, 6:10] = np.arange(16).reshape(4, 4) + 1
    inside[mask] += 0.5  # the top 5% (20 of 400 pixels): the 16 above and 4 more of the mask
    assert measures.activation_precision(inside, mask) == 1.0
    assert measures.activation_precision(-inside, mask) == 0.0  # peaks wholly on the background
    assert measures.top_fraction(inside).sum() == 20


def test_the_grid_cell_is_where_the_maximum_is():
    activation = np.zeros((28, 28))
    activation[20, 3] = 1.0
    assert measures.grid_cell(activation, 4) == 2 * 4 + 0  # row 20 // 7 = 2, column 3 // 7 = 0
    activation[27, 27] = 2.0
    assert measures.grid_cell(activation, 4) == 15


def test_rank_correlation_and_curve_area():
    a = np.arange(49.0).reshape(7, 7)
    assert measures.rank_correlation(a, a * 3 + 1) == pytest.approx(1.0)
    assert measures.rank_correlation(a, -a) == pytest.approx(-1.0)
    assert measures.rank_correlation(a, np.ones_like(a)) == 0.0
    assert measures.curve_area(np.ones(21)) == pytest.approx(1.0)
    assert measures.curve_area(np.linspace(1, 0, 11)) == pytest.approx(0.5)
    assert measures.pixel_order(np.array([[0.1, 0.9], [0.5, 0.9]])).tolist() == [1, 3, 2, 0]


def protopnet(seed: int = 0):
    from tiny_configs import tiny_protopnet_dict

    from training.checkpoint import build_model
    from training.config import Config

    torch.manual_seed(seed)
    return build_model(Config.from_dict(tiny_protopnet_dict())).eval()


def sanity_correlation(model, images) -> float:
    randomised = probes.randomised_backbone(model, seed=1)
    a = probes.outputs(model, images, "similarity_maps").numpy()
    b = probes.outputs(randomised, images, "similarity_maps").numpy()
    return float(np.mean([measures.rank_correlation(a[i, j], b[i, j]) for i in range(len(a))
                          for j in range(a.shape[1])]))


def test_explanations_that_ignore_the_learned_backbone_fail_the_sanity_check():
    """A backbone without weights (a max-pool): randomising it changes nothing, so its maps stay the
    same (rank correlation 1, a fail); a backbone with weights, re-initialised, changes them."""
    images = torch.rand(6, 1, 28, 28)
    model = protopnet()
    assert sanity_correlation(model, images) < 0.5
    model.features = nn.MaxPool2d(4)  # 28 -> 7, the map size of small_cnn
    model.add_on = nn.Sequential(nn.Conv2d(1, 16, 1), nn.Sigmoid())
    assert sanity_correlation(model, images) == pytest.approx(1.0)


def test_deletion_starts_at_the_whole_image_and_insertion_ends_there():
    model = protopnet()
    image = torch.rand(1, 28, 28)
    order = np.random.default_rng(0).permutation(28 * 28)
    deletion, insertion = probes.ordered_pixel_runs(model, image, prototype=3, order=order, steps=10)
    assert len(deletion) == len(insertion) == 11
    assert deletion[0] == pytest.approx(1.0) and insertion[-1] == pytest.approx(1.0)
    assert deletion[-1] == pytest.approx(insertion[0])  # both the blank input


def test_noise_is_in_pixel_units_and_seeded():
    images = torch.zeros(2, 3, 4, 4)
    a = probes.input_noise(images, 0.1, [0.5, 0.5, 0.5], seed=3)
    assert torch.equal(a, probes.input_noise(images, 0.1, [0.5, 0.5, 0.5], seed=3))
    assert float(a.std()) == pytest.approx(0.2, rel=0.3)  # 0.1 in pixels is 0.2 after dividing by std 0.5
