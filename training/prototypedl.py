"""PrototypeDL (Li, Liu, Chen, Rudin, AAAI 2018): an autoencoder with a prototype layer on its latent.

    x --encoder f--> z (latent, in (0,1)^q) --prototype layer p--> d (squared L2 to m prototypes)
      --W (K x m)--> logits --softmax--> probabilities
    z --decoder g--> reconstruction of x; prototypes --g--> their pictures

Loss (eq. 7): E + lambda R + lambda1 R1 + lambda2 R2.

The paper's ablation is the same module under other configs: `classifier: fully_connected` puts a
linear layer of m outputs where the prototype layer was (no distances, so no R1 and R2), and
`decoder: false` drops the decoder (no reconstruction, no R): with ReLU throughout, a plain CNN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from training.config import LossConfig, ModelConfig
from training.families import BATCH, PrototypeRecord

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}


def conv_sizes(input_size: int, n_layers: int) -> list[int]:
    """Spatial sizes through n stride-2 'same' convolutions: 28 -> 14 -> 7 -> 4 -> 2."""
    sizes = [input_size]
    for _ in range(n_layers):
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


class Encoder(nn.Module):
    """3x3 stride-2 convolutions; hidden activation from the config, sigmoid on the latent maps."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        maps = [cfg.in_channels, *cfg.widths, cfg.latent_maps]
        layers = []
        for i in range(len(maps) - 1):
            last = i == len(maps) - 2
            activation = cfg.latent_activation if last else cfg.hidden_activation
            layers += [nn.Conv2d(maps[i], maps[i + 1], 3, stride=2, padding=1), ACTIVATIONS[activation]()]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):  # [N, C, H, W] -> [N, latent_maps, h, w]
        return self.layers(x)


class Decoder(nn.Module):
    """Transposed convolutions mirroring the encoder (not tied to it); sigmoid on the image."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        maps = [cfg.in_channels, *cfg.widths, cfg.latent_maps][::-1]
        sizes = conv_sizes(cfg.input_size, len(maps) - 1)[::-1]
        layers = []
        for i in range(len(maps) - 1):
            last = i == len(maps) - 2
            # A 3x3 stride-2 transposed conv with padding 1 gives 2n - 1 + output_padding.
            output_padding = sizes[i + 1] - (2 * sizes[i] - 1)
            layers += [nn.ConvTranspose2d(maps[i], maps[i + 1], 3, stride=2, padding=1,
                                          output_padding=output_padding),
                       nn.Sigmoid() if last else ACTIVATIONS[cfg.hidden_activation]()]
        self.layers = nn.Sequential(*layers)

    def forward(self, z):  # [N, latent_maps, h, w] -> [N, C, H, W]
        return self.layers(z)


def squared_distances(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """||z_i - p_j||^2 for z [N, q] and prototypes [m, q] -> [N, m]."""
    return ((z.unsqueeze(1) - prototypes.unsqueeze(0)) ** 2).sum(dim=-1)


@dataclass
class Output:
    latent: torch.Tensor  # [N, q]
    reconstruction: torch.Tensor | None  # [N, C, H, W]; None without a decoder
    distances: torch.Tensor | None  # [N, m]; None without the prototype layer
    logits: torch.Tensor  # [N, K]


class PrototypeDL(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg) if cfg.decoder else None
        h = conv_sizes(cfg.input_size, len(cfg.widths) + 1)[-1]
        self.latent_shape = (cfg.latent_maps, h, h)
        self.latent_dim = cfg.latent_maps * h * h
        if cfg.classifier == "prototypes":
            # The latent is a sigmoid, so the unit hypercube is where encoded inputs live.
            self.prototypes = nn.Parameter(torch.rand(cfg.n_prototypes, self.latent_dim))
        else:
            self.prototypes = None
            self.fully_connected = nn.Linear(self.latent_dim, cfg.n_prototypes)
            # Like the distances, the layer's outputs go to W with no activation between. On a sigmoid
            # latent it is initialised as the linear part of the prototype layer it replaces:
            # ||z - p||^2 = -2 p.z + ||p||^2 + ||z||^2, p uniform on the unit cube like the prototypes.
            # With PyTorch's default (+-1/sqrt(q)) the encoder's near-constant initial latent gives the
            # classifier almost no signal, and the reconstruction term saturates the latent within ~50
            # steps, for good (measured: cross-entropy stuck at ln 10). A ReLU latent (the plain CNN)
            # keeps the default.
            if cfg.latent_activation == "sigmoid":
                p = torch.rand(cfg.n_prototypes, self.latent_dim)
                with torch.no_grad():
                    self.fully_connected.weight.copy_(-2 * p)
                    self.fully_connected.bias.copy_((p ** 2).sum(dim=1))
        self.last_layer = nn.Linear(cfg.n_prototypes, cfg.n_classes, bias=False)  # W: K x m
        if cfg.fixed_identity_weights:
            self.last_layer.weight.data.copy_(-torch.eye(cfg.n_classes))
            self.last_layer.weight.requires_grad_(False)

    def encode(self, x):  # [N, C, H, W] -> [N, q]
        return self.encoder(x).flatten(1)

    def decode(self, z):  # [N, q] -> [N, C, H, W]
        return self.decoder(z.view(-1, *self.latent_shape))

    def forward(self, x) -> Output:
        z = self.encode(x)
        if self.prototypes is None:
            d, features = None, self.fully_connected(z)
        else:
            d = features = squared_distances(z, self.prototypes)
        reconstruction = self.decode(z) if self.decoder is not None else None
        return Output(latent=z, reconstruction=reconstruction, distances=d, logits=self.last_layer(features))

    def classify(self, x):
        """Logits only, skipping the decoder (evaluation)."""
        z = self.encode(x)
        if self.prototypes is None:
            return self.last_layer(self.fully_connected(z))
        return self.last_layer(squared_distances(z, self.prototypes))


@dataclass
class LossTerms:
    total: torch.Tensor
    E: torch.Tensor  # cross-entropy
    R: torch.Tensor  # reconstruction: mean over images of the squared L2 pixel error
    R1: torch.Tensor  # mean over prototypes of the distance to the nearest encoded input
    R2: torch.Tensor  # mean over encoded inputs of the distance to the nearest prototype

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "E", "R", "R1", "R2")}


def prototypedl_loss(out: Output, x: torch.Tensor, y: torch.Tensor, cfg: LossConfig) -> LossTerms:
    """The paper's eq. 7 on one minibatch (R1's minimum taken over the minibatch, as in the paper)."""
    E = F.cross_entropy(out.logits, y)
    zero = E.new_zeros(())  # a term whose part of the model is absent (the ablation's variants)
    R = ((out.reconstruction - x) ** 2).flatten(1).sum(dim=1).mean() if out.reconstruction is not None else zero
    if out.distances is None:
        R1 = R2 = zero
    else:
        R1 = out.distances.min(dim=0).values.mean()  # [N, m] -> nearest input per prototype
        R2 = out.distances.min(dim=1).values.mean()  # [N, m] -> nearest prototype per input
    total = E + cfg.lambda_R * R + cfg.lambda_R1 * R1 + cfg.lambda_R2 * R2
    return LossTerms(total=total, E=E, R=R, R1=R1, R2=R2)


def class_identities(weight: torch.Tensor) -> list[int]:
    """Each prototype's class: the class of its most negative weight (W is K x m)."""
    return weight.argmin(dim=0).tolist()


# -- the family's registry row (training/families.py): what export and the CLI need of PrototypeDL ---
def graph_outputs(model: PrototypeDL) -> dict[str, list]:
    c = model.cfg
    return {"logits": [BATCH, c.n_classes], "probabilities": [BATCH, c.n_classes],
            "distances": [BATCH, c.n_prototypes], "latent": [BATCH, model.latent_dim],
            "reconstruction": [BATCH, c.in_channels, c.input_size, c.input_size]}


def graph_forward(model: PrototypeDL, image: torch.Tensor) -> tuple:
    out = model(image)
    return out.logits, torch.softmax(out.logits, dim=1), out.distances, out.latent, out.reconstruction


class PrototypeDLDecoder(nn.Module):
    """decoder.onnx: latent [N, q] -> image [N, C, H, W]."""

    def __init__(self, model: PrototypeDL):
        super().__init__()
        self.model = model

    def forward(self, latent):
        return self.model.decode(latent)


@torch.no_grad()
def prototype_records(model: PrototypeDL, push_set=None, mean=None, std=None) -> list[PrototypeRecord]:
    """Each prototype decoded to a picture; its class is that of its most negative weight."""
    pictures = model.decode(model.prototypes).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    W = model.last_layer.weight.detach()  # [K, m]
    identities = class_identities(W)
    return [PrototypeRecord(class_identity=identities[j], weights=W[:, j].tolist(),
                            pictures={"image": Image.fromarray(p[0] if p.shape[0] == 1 else p.transpose(1, 2, 0))})
            for j, p in enumerate(pictures)]  # p: [C, H, W]
