"""ProtoPNet-style pruning: k = 6 nearest training images, pruned when fewer than 3 are of its class."""

import torch

from revision.prune import nearest_labels, prune_candidates
from training.checkpoint import load_checkpoint
from training.mnist import load_mnist


def test_prune_rule_by_hand():
    neighbours = torch.tensor([[1, 1, 1, 0, 0, 0],  # 3 of class 1: kept
                               [2, 2, 0, 0, 0, 0],  # 2 of class 2: pruned
                               [0, 0, 0, 0, 0, 0]])  # none of class 3: pruned
    assert prune_candidates(neighbours, [1, 2, 3]) == [1, 2]
    assert prune_candidates(neighbours, [1, 2, 3], threshold=2) == [2]


def test_nearest_labels_finds_the_image_a_prototype_sits_on(tiny_checkpoint, mnist_root):
    model, config, _ = load_checkpoint(tiny_checkpoint)
    d = config.data
    train = load_mnist(mnist_root, d.dataset, d.val_size, d.split_seed, d.train_subset)["train"]
    with torch.no_grad():
        model.prototypes[:3] = model.encode(train.images[[10, 20, 30]])  # prototypes 0-2 sit on images 10, 20, 30
    labels = nearest_labels(model, train.images, train.labels)
    assert labels.shape == (model.prototypes.shape[0], 6)
    assert labels[:3, 0].tolist() == train.labels[[10, 20, 30]].tolist()
