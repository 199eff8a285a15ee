"""Receptive-field arithmetic against a gradient-based brute force, for every backbone.

Brute force: make the network linear with strictly positive weights (ReLU -> identity, max
pooling -> average pooling with the same geometry, BatchNorm -> identity, convolution weights
1/fan-in, biases 0). Then the gradient of one output position with respect to the input is
strictly positive exactly on the pixels that position can see, and zero elsewhere: its bounding
box must equal the arithmetic's box. Each backbone is checked whole (small input, so the fields
are clipped by the border) and cut after its deepest stage whose field still fits well inside
the input (so the unclipped extent is checked too).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from training.backbones import BACKBONES, build_backbone
from training.receptive_field import SpatialLayer, receptive_field, spatial_layers


def linearized(module: nn.Module) -> nn.Module:
    net = copy.deepcopy(module).eval()
    for name, m in list(net.named_modules()):
        replacement = None
        if isinstance(m, nn.ReLU):
            replacement = nn.Identity()
        elif isinstance(m, nn.MaxPool2d):
            replacement = nn.AvgPool2d(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode)
        elif isinstance(m, nn.BatchNorm2d):
            replacement = nn.Identity()
        elif isinstance(m, nn.Conv2d):
            with torch.no_grad():
                m.weight.fill_(1.0 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
        if replacement is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent_name) if parent_name else net, child, replacement)
    return net


def gradient_box(net: nn.Module, channels: int, size: int, row: int, col: int) -> tuple[int, int, int, int]:
    x = torch.ones(1, channels, size, size, requires_grad=True)
    net(x)[0, 0, row, col].backward()
    seen = (x.grad[0].abs().sum(0) > 0).nonzero()
    return (int(seen[:, 0].min()), int(seen[:, 0].max()) + 1, int(seen[:, 1].min()), int(seen[:, 1].max()) + 1)


def positions(size: int) -> list[tuple[int, int]]:
    if size <= 3:
        return [(r, c) for r in range(size) for c in range(size)]
    return [(0, 0), (0, size - 1), (size - 1, 0), (size // 2, size // 2), (1, size - 2)]


def flat_children(module: nn.Module) -> list[nn.Module]:
    out = []
    for child in module.children():
        out += flat_children(child) if type(child) is nn.Sequential else [child]
    return out


def check(module: nn.Module, channels: int, size: int) -> None:
    rf = receptive_field(spatial_layers(module), size)
    net = linearized(module)
    with torch.no_grad():
        out = net(torch.ones(1, channels, size, size))
    assert out.shape[-1] == rf.size
    for row, col in positions(rf.size):
        assert gradient_box(net, channels, size, row, col) == rf.box(row, col), (row, col, rf)


@pytest.mark.parametrize("name", BACKBONES)
def test_receptive_field_matches_brute_force(name):
    channels = 1 if name == "small_cnn" else 3
    size = 28 if name == "small_cnn" else 48
    backbone = build_backbone(name, in_channels=channels)
    check(backbone.module, channels, 28 if name == "small_cnn" else 32)  # whole network, clipped fields

    # The deepest cut whose field fits inside the input unclipped, for the interior positions.
    children = flat_children(backbone.module)
    cut = None
    for n in range(1, len(children) + 1):
        prefix = nn.Sequential(*children[:n])
        layers = spatial_layers(prefix)
        if layers and receptive_field(layers, size).rf <= size * 3 // 4:
            cut = prefix
    assert cut is not None
    rf = receptive_field(spatial_layers(cut), size)
    assert rf.rf > 3 and rf.box(rf.size // 2, rf.size // 2)[1] - rf.box(rf.size // 2, rf.size // 2)[0] == rf.rf
    check(cut, channels, size)


def test_known_receptive_fields():
    """The published sizes: ResNet-18 435, VGG-16 212, DenseNet-121 2071 (at 224), small CNN 18."""
    assert build_backbone("resnet18").receptive_field(224).rf == 435
    assert build_backbone("vgg16").receptive_field(224).rf == 212
    assert build_backbone("densenet121").receptive_field(224).rf == 2071
    small = build_backbone("small_cnn", in_channels=1).receptive_field(28)
    assert (small.size, small.jump, small.rf, small.start) == (7, 4, 18, -7)
    assert small.box(0, 0) == (0, 11, 0, 11) and small.box(3, 6) == (5, 23, 17, 28)


def test_even_kernels_and_shortcuts():
    """A 2x2 pooling shifts the field by whole pixels; a shortcut branch adds no layer."""
    rf = receptive_field([SpatialLayer(2, 2, 0), SpatialLayer(3, 1, 1)], 8)
    assert (rf.size, rf.jump, rf.rf, rf.start) == (4, 2, 6, -2)
    assert rf.box(0, 3) == (0, 4, 4, 8)
    resnet = build_backbone("resnet18").module
    assert len(spatial_layers(resnet)) == 1 + 1 + 4 * 2 * 2  # stem conv, max pool, 8 blocks of 2 convs
