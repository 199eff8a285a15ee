"""Convolutional backbones by name: `build_backbone("resnet18", weights=None)`.

One place maps a name to a feature extractor (the network up to its last convolutional feature
map, classifier head removed) and reports its output channels and receptive-field layers.
Weights are explicit: None (random initialisation, the default and what tests use) or a
torchvision weights name such as "IMAGENET1K_V1" or "DEFAULT" for a user who has them cached;
nothing here downloads on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn
import torchvision

from training.receptive_field import ReceptiveField, SpatialLayer, receptive_field, spatial_layers

TORCHVISION_BACKBONES = ("resnet18", "resnet34", "resnet50", "vgg11", "vgg16", "vgg19", "densenet121")
SMALL_BACKBONES = ("small_cnn",)
BACKBONES = TORCHVISION_BACKBONES + SMALL_BACKBONES


@dataclass
class Backbone:
    name: str
    module: nn.Module  # [N, in_channels, H, W] -> [N, out_channels, h, w]
    out_channels: int
    layers: list[SpatialLayer]  # the spatial layers in execution order (receptive-field arithmetic)

    def receptive_field(self, input_size: int) -> ReceptiveField:
        return receptive_field(self.layers, input_size)


def small_cnn(in_channels: int = 1, widths: tuple[int, int, int] = (16, 32, 64)) -> nn.Sequential:
    """For 28x28 digits: 3x3 conv-BN-ReLU-pool twice, then conv-BN-ReLU -> 7x7 map, receptive field 18.

    Batch normalisation because this backbone trains from scratch: without it, ProtoPNet's
    distance head learns much more slowly (README "Measured choices")."""
    a, b, c = widths

    def block(n_in: int, n_out: int) -> list[nn.Module]:
        return [nn.Conv2d(n_in, n_out, 3, padding=1, bias=False), nn.BatchNorm2d(n_out), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(in_channels, a), nn.MaxPool2d(2), *block(a, b), nn.MaxPool2d(2), *block(b, c))


def _resnet(factory: Callable) -> Callable:
    def build(weights):
        net = factory(weights=weights)
        module = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                               net.layer4)
        return module, net.fc.in_features

    return build


def _vgg(factory: Callable, config: str) -> Callable:
    def build(weights):
        if weights is None:
            # The features alone, initialised as torchvision's VGG does: building the whole model
            # would spend seconds initialising a 100M-parameter classifier head that is dropped.
            features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs[config])
            for m in features.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(m.bias)
        else:
            features = factory(weights=weights).features
        convs = [m for m in features if isinstance(m, nn.Conv2d)]
        return features, convs[-1].out_channels

    return build


def _densenet(factory: Callable) -> Callable:
    def build(weights):
        net = factory(weights=weights)
        # torchvision applies this ReLU in DenseNet.forward, after `features`.
        return nn.Sequential(net.features, nn.ReLU(inplace=True)), net.classifier.in_features

    return build


_TORCHVISION = {
    "resnet18": _resnet(torchvision.models.resnet18),
    "resnet34": _resnet(torchvision.models.resnet34),
    "resnet50": _resnet(torchvision.models.resnet50),
    "vgg11": _vgg(torchvision.models.vgg11, "A"),
    "vgg16": _vgg(torchvision.models.vgg16, "D"),
    "vgg19": _vgg(torchvision.models.vgg19, "E"),
    "densenet121": _densenet(torchvision.models.densenet121),
}


def build_backbone(name: str, weights: str | None = None, in_channels: int = 3) -> Backbone:
    """The named feature extractor; `weights` None means random initialisation (no download)."""
    if name == "small_cnn":
        if weights is not None:
            raise ValueError("small_cnn has no pretrained weights; use weights=None")
        module = small_cnn(in_channels)
        return Backbone(name, module, module[-3].out_channels, spatial_layers(module))
    if name not in _TORCHVISION:
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    if in_channels != 3:
        raise ValueError(f"{name} takes 3 input channels (got {in_channels}); convert grey images to RGB")
    module, out_channels = _TORCHVISION[name](weights)
    return Backbone(name, module, out_channels, spatial_layers(module))
