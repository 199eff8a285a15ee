"""ProtoPNet (Chen, Li, Tao, Barnett, Su, Rudin, NeurIPS 2019): "This Looks Like That".

    x --backbone f--> [N, C, h, w] --add-on (1x1 conv, ReLU, 1x1 conv, sigmoid)--> z [N, D, h, w]
      --prototype layer--> distance maps [N, M, h, w]: squared L2 of every patch of z to each
                           prototype p_j (D x 1 x 1), computed as convolutions
      --min over positions--> distances [N, M]
      --log((d + 1) / (d + eps))--> similarities [N, M]
      --last layer h (K x M, no bias)--> logits [N, K]

Prototype j stands for class j // (M / K) by construction (`prototype_class_identity`).
Loss: CE + lambda_cluster * cluster_cost - lambda_separation * separation_cost + lambda_l1 * L1
of the last-layer weights from each prototype to the classes it does not stand for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from protoserve.similarity import similarity  # log((d + 1) / (d + eps)), shared with inference
from training.backbones import BACKBONES, build_backbone
from training.config import Config, LossConfig, ModelConfig
from training.families import BATCH
from training.receptive_field import ReceptiveField


def squared_distance_maps(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """||z[:, :, y, x] - p_j||^2 for every position and prototype, as convolutions.

    z [N, D, h, w], prototypes [M, D, 1, 1] -> [N, M, h, w], using
    ||z - p||^2 = sum_c z_c^2 - 2 <z, p> + ||p||^2: the cross term is a 1x1 convolution with the
    prototypes as filters. Clamped at 0 (rounding can make the difference slightly negative).
    """
    z2 = F.conv2d(z ** 2, torch.ones_like(prototypes[:1]))  # [N, 1, h, w]
    zp = F.conv2d(z, prototypes)  # [N, M, h, w]
    p2 = (prototypes ** 2).sum(dim=(1, 2, 3)).view(1, -1, 1, 1)  # [1, M, 1, 1]
    return F.relu(z2 - 2 * zp + p2)


def subtracted_distance_maps(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """The same [N, M, h, w] without cancellation: (z_c - p_jc)^2 first, then the sum over channels
    as a grouped 1x1 convolution of ones. M times the memory of z, so it is the exported graph's
    form (ONNX parity needs small distances exact to float32), not the training form."""
    M = prototypes.shape[0]
    diff = z.repeat(1, M, 1, 1) - prototypes.reshape(1, -1, 1, 1)  # [N, M*D, h, w]
    return F.conv2d(diff ** 2, torch.ones_like(prototypes), groups=M)


@dataclass
class Output:
    logits: torch.Tensor  # [N, K]
    distances: torch.Tensor  # [N, M] minimum over positions
    distance_maps: torch.Tensor  # [N, M, h, w]
    similarity_maps: torch.Tensor  # [N, M, h, w]
    similarities: torch.Tensor  # [N, M]
    latent: torch.Tensor | None = None  # [N, D, h, w] the add-on output z the prototypes are compared with


class ProtoPNet(nn.Module):
    def __init__(self, cfg: ModelConfig, backbone_weights: str | None = None):
        """`backbone_weights` (e.g. cfg.backbone_weights) loads pretrained backbone weights; None: random."""
        super().__init__()
        self.cfg = cfg
        backbone = build_backbone(cfg.backbone, backbone_weights, cfg.in_channels)
        self.features = backbone.module
        self.rf: ReceptiveField = backbone.receptive_field(cfg.input_size)
        D, M, K = cfg.prototype_dim, cfg.n_prototypes, cfg.n_classes
        self.add_on = nn.Sequential(nn.Conv2d(backbone.out_channels, D, 1), nn.ReLU(),
                                    nn.Conv2d(D, D, 1), nn.Sigmoid())
        # The add-on output is a sigmoid, so prototypes start uniformly in the unit cube as the paper.
        self.prototypes = nn.Parameter(torch.rand(M, D, 1, 1))
        self.last_layer = nn.Linear(M, K, bias=False)
        identity = torch.zeros(M, K)
        identity[torch.arange(M), torch.arange(M) // (M // K)] = 1
        self.register_buffer("prototype_class_identity", identity)  # [M, K] one-hot
        # Push provenance (-1 until pushed): source index in the push set, patch row and column,
        # receptive-field box and high-activation box (y0, y1, x0, x1, end-exclusive).
        self.register_buffer("push_source", torch.full((M, 3), -1, dtype=torch.long))
        self.register_buffer("push_rf_box", torch.full((M, 4), -1, dtype=torch.long))
        self.register_buffer("push_activation_box", torch.full((M, 4), -1, dtype=torch.long))
        self.set_last_layer_incorrect_connection(-0.5)

    @property
    def map_size(self) -> int:
        return self.rf.size

    def set_last_layer_incorrect_connection(self, incorrect: float) -> None:
        """+1 from each prototype to its own class, `incorrect` to the others (the paper: -0.5)."""
        positive = self.prototype_class_identity.T  # [K, M]
        with torch.no_grad():
            self.last_layer.weight.copy_(positive + incorrect * (1 - positive))

    def latent(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, D, h, w]
        return self.add_on(self.features(x))

    def forward(self, x: torch.Tensor, exact: bool = False) -> Output:
        """exact=True computes the distances by subtraction (export); the default expands the square."""
        distance_maps = subtracted_distance_maps if exact else squared_distance_maps
        z = self.latent(x)
        maps = distance_maps(z, self.prototypes)  # [N, M, h, w]
        # The minimum over positions as a max-pool whose kernel is fixed at construction (the map
        # size for this input size), so an exported graph keeps its batch axis dynamic.
        distances = -F.max_pool2d(-maps, kernel_size=self.map_size).flatten(1)  # [N, M]
        similarities = similarity(distances)
        return Output(logits=self.last_layer(similarities), distances=distances, distance_maps=maps,
                      similarity_maps=similarity(maps), similarities=similarities, latent=z)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).logits

    def class_identities(self) -> list[int]:
        return self.prototype_class_identity.argmax(dim=1).tolist()


@dataclass
class LossTerms:
    total: torch.Tensor
    cross_entropy: torch.Tensor
    cluster_cost: torch.Tensor  # mean over images of the distance to the nearest own-class prototype
    separation_cost: torch.Tensor  # mean over images of the distance to the nearest other-class prototype
    l1: torch.Tensor  # L1 of the last-layer weights to the classes a prototype does not stand for

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach())
                for k in ("total", "cross_entropy", "cluster_cost", "separation_cost", "l1")}


def masked_min(distances: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise minimum of distances [N, M] over the columns where mask [N, M] is True."""
    return torch.where(mask, distances, torch.full_like(distances, torch.inf)).min(dim=1).values


def l1_wrong_class(model: ProtoPNet) -> torch.Tensor:
    return (model.last_layer.weight * (1 - model.prototype_class_identity.T)).abs().sum()


def protopnet_loss(out: Output, y: torch.Tensor, model: ProtoPNet, cfg: LossConfig) -> LossTerms:
    own = model.prototype_class_identity[:, y].T.bool()  # [N, M]: prototype j stands for y_i
    ce = F.cross_entropy(out.logits, y)
    cluster = masked_min(out.distances, own).mean()
    separation = masked_min(out.distances, ~own).mean()
    l1 = l1_wrong_class(model)
    total = ce + cfg.lambda_cluster * cluster - cfg.lambda_separation * separation + cfg.lambda_l1 * l1
    return LossTerms(total=total, cross_entropy=ce, cluster_cost=cluster, separation_cost=separation, l1=l1)


# -- the family's registry row (training/families.py): what export and the CLI need of ProtoPNet ----
def graph_outputs(model: ProtoPNet) -> dict[str, list]:
    c, h = model.cfg, model.map_size
    return {"logits": [BATCH, c.n_classes], "probabilities": [BATCH, c.n_classes],
            "distances": [BATCH, c.n_prototypes], "similarity_maps": [BATCH, c.n_prototypes, h, h],
            "pooled_latent": [BATCH, c.prototype_dim]}


def graph_forward(model: ProtoPNet, image: torch.Tensor) -> tuple:
    # Distances by subtraction: the expanded square of training loses small distances to float32
    # cancellation, and with it the parity of the similarities (log(1/d) near 0).
    out = model(image, exact=True)
    # pooled_latent: z averaged over positions, the input's place in the latent space for the
    # out-of-domain score (export/calibration.py)
    return out.logits, torch.softmax(out.logits, dim=1), out.distances, out.similarity_maps, out.latent.mean(dim=(2, 3))


def config_checks(config: Config) -> list[tuple[bool, str]]:
    m, s = config.model, config.schedule
    return [
        (m.backbone in BACKBONES, f"model.backbone must be one of {', '.join(BACKBONES)}"),
        (m.n_prototypes % m.n_classes == 0, "model.n_prototypes must be a multiple of n_classes (ProtoPNet)"),
        (m.prototype_dim > 0, "model.prototype_dim must be > 0"),
        (s.warm_epochs >= 0 and s.push_start > 0 and s.push_every > 0 and s.last_layer_epochs >= 0,
         "schedule: warm_epochs and last_layer_epochs must be >= 0, push_start and push_every > 0"),
        (s.lr_step_epochs > 0 and 0 < s.lr_gamma <= 1, "schedule.lr_step_epochs must be > 0, lr_gamma in (0, 1]"),
    ]


def build(config: ModelConfig, initial_weights: bool = True) -> ProtoPNet:
    return ProtoPNet(config, backbone_weights=config.backbone_weights if initial_weights else None)
