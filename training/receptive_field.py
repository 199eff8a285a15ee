"""Receptive fields: which input pixels a position of a convolutional feature map can see.

The arithmetic is written once, for a chain of spatial layers (kernel k, stride s, padding p):
a feature-map position i covers input pixels [start + i * jump, start + i * jump + size - 1],
where, through one more layer,

    start' = start - p * jump        size' = size + (k - 1) * jump        jump' = jump * s

(all integers, so even kernels such as 2x2 pooling need no half-pixel centres). The layers are
read off a module by `spatial_layers`, in the order they run; branches that only shortcut a
block (ResNet's `downsample`) are skipped, since the main path's field contains theirs.
tests/training/test_receptive_field.py checks the boxes against input gradients for every
backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

SHORTCUT_NAMES = ("downsample",)


@dataclass(frozen=True)
class SpatialLayer:
    kernel: int
    stride: int
    padding: int
    ceil_mode: bool = False

    def output_size(self, n: int) -> int:
        span = n + 2 * self.padding - self.kernel
        steps = -(-span // self.stride) if self.ceil_mode else span // self.stride
        if self.ceil_mode and steps * self.stride >= n + self.padding:  # PyTorch's last-window rule
            steps -= 1
        return steps + 1


def _single(value) -> int:
    if isinstance(value, tuple):
        if len(set(value)) != 1:
            raise ValueError(f"non-square spatial parameter {value}")
        return value[0]
    return value


def spatial_layers(module: nn.Module) -> list[SpatialLayer]:
    """The convolutions and poolings of `module` along its main path, in execution order."""
    layers = []
    for name, m in module.named_modules():
        if any(part in SHORTCUT_NAMES for part in name.split(".")):
            continue
        if isinstance(m, nn.Conv2d):
            if _single(m.dilation) != 1:
                raise ValueError(f"{name}: dilated convolutions are not supported")
            layers.append(SpatialLayer(_single(m.kernel_size), _single(m.stride), _single(m.padding)))
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            if isinstance(m, nn.MaxPool2d) and _single(m.dilation) != 1:
                raise ValueError(f"{name}: dilated pooling is not supported")
            stride = m.stride if m.stride is not None else m.kernel_size
            layers.append(SpatialLayer(_single(m.kernel_size), _single(stride), _single(m.padding),
                                       bool(m.ceil_mode)))
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            raise ValueError(f"{name}: adaptive pooling has no fixed receptive field; end the backbone before it")
    return layers


@dataclass(frozen=True)
class ReceptiveField:
    """Feature map of `size` x `size` positions; position i sees input pixels start + i*jump ... + rf - 1."""

    input_size: int
    size: int
    jump: int
    rf: int
    start: int

    def span(self, i: int) -> tuple[int, int]:
        """Input rows (or columns) [lo, hi) seen by position i, clipped to the image."""
        lo = self.start + i * self.jump
        return max(lo, 0), min(lo + self.rf, self.input_size)

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1), end-exclusive, of the input pixels feature position (row, col) sees."""
        y0, y1 = self.span(row)
        x0, x1 = self.span(col)
        return y0, y1, x0, x1


def receptive_field(layers: list[SpatialLayer], input_size: int) -> ReceptiveField:
    """The receptive field of the last layer's positions for a square input of `input_size` pixels."""
    size, jump, rf, start = input_size, 1, 1, 0
    for layer in layers:
        start -= layer.padding * jump
        rf += (layer.kernel - 1) * jump
        jump *= layer.stride
        size = layer.output_size(size)
        if size < 1:
            raise ValueError(f"input of {input_size} pixels is too small: a layer's output is empty")
    return ReceptiveField(input_size=input_size, size=size, jump=jump, rf=rf, start=start)
