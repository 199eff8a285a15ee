"""Outlier exposure for both families (config section `outlier_exposure`, docs/outlier_exposure.md).

Which term, and why. The served out-of-domain score (protoserve/domain_scores.py, inference/domain.py)
never reads the softmax: it is Fisher's combination of the nearest prototype's distance, the Mahalanobis
distance of the whole distance profile and that of the latent vector. Pushing the outliers' softmax
towards uniform (Hendrycks et al. 2019) would change what the score does not look at. So the term is a
margin on the prototype distances: each outlier's nearest-prototype distance is pushed above a margin,
the margin_quantile of the in-domain batch's own nearest distances (detached; 0.99 is about where the
score's nearest-distance part puts its 1% threshold), times margin_scale (scale-free: see margin_term):

    L_OE = mean over outliers of relu(1 - d_min(outlier) / margin)

(divided by the margin, so the weight does not depend on the scale of a family's distances). Moving an
outlier away from every prototype moves its latent vector too, which the other two parts read. The
softmax-to-uniform term is there as an option (uniform_weight, default 0), not the default.

Outlier batches are sampled with equal weight per source (the 8,000 animal silhouettes would otherwise
drown the stroke fonts), from a generator seeded by (seed, epoch, step): a resumed run draws the same
ones. By default batch normalisation layers run on the outliers with their running statistics and leave
them alone (as at inference), so the outliers never shift what in-domain images are normalised by. But the
term then acts on the network as inference runs it while the digits train it as training runs it, and
ProtoPNet trained from scratch this way met the term through that gap: its training outliers left the
margin while its validation accuracy fell to 50% and the held-out outliers came no further
(docs/results.md). batchnorm "batch" passes the outliers with the digits in one batch instead.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from training.config import Config
from training.elastic import elastic_deform
from training.outliers import SOURCES, OutlierSet, build_outliers


class OutlierExposure:
    def __init__(self, config: Config, device, mean=None, std=None, log=print):
        o = config.outlier_exposure
        self.cfg, self.device = o, device
        self.mean, self.std = mean, std
        train = build_outliers(o.sources, "train", o.val_share, o.seed, o.per_unit)
        val = build_outliers(o.sources, "val", o.val_share, o.seed, o.per_unit)
        self.train_units, self.val_units = sorted(set(train.units)), sorted(set(val.units))
        self.images = self._normalised(train.images)
        self.val_images = self._normalised(val.images)
        self.weights = torch.from_numpy(_equal_share(train))
        self.per_step = max(1, round(o.batch_share * config.train.batch_size))
        self.profile = ProfileMargin(config.model.n_classes) if o.profile_weight > 0 else None
        log(f"outlier exposure: {len(train)} training outliers from {len(self.train_units)} fonts/classes, "
            f"{len(val)} validation outliers from {len(self.val_units)} others; {self.per_step} per step, "
            f"weight {o.weight}")

    def _normalised(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images)
        if self.mean is not None:
            x = (x - torch.tensor(self.mean).view(1, -1, 1, 1)) / torch.tensor(self.std).view(1, -1, 1, 1)
        return x

    def batch(self, epoch: int, step: int, elastic=None, generator=None) -> torch.Tensor:
        """The outliers of one training step: per_step images, each source equally likely; elastic
        (sigma, alpha) deforms them as the digits are."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch * 10_007 + step)
        idx = torch.multinomial(self.weights, self.per_step, replacement=True, generator=g)
        x = self.images[idx].to(self.device)
        if elastic is not None:
            x = elastic_deform(x, *elastic, generator=generator)
        return x

    def forward(self, model: nn.Module, x: torch.Tensor):
        with running_batchnorm(model):
            return model(x)

    def forward_both(self, model: nn.Module, x: torch.Tensor, xo: torch.Tensor):
        """(the digits' output, the outliers'): two passes (batchnorm "running") or one (batchnorm "batch")."""
        if self.cfg.batchnorm == "running":
            return model(x), self.forward(model, xo)
        both = model(torch.cat([x, xo]))
        return _rows(both, slice(0, len(x))), _rows(both, slice(len(x), None))

    def states(self) -> dict:
        """What of the term is training state, for a trainer's optimizer_states (exact resume)."""
        return {} if self.profile is None else {"oe_profile": self.profile}

    def term(self, in_distances: torch.Tensor, out_distances: torch.Tensor, out_logits: torch.Tensor,
             in_logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(weighted loss to add, its parts as floats); in_logits, the digits', label them (profile_weight)."""
        loss, parts = margin_term(in_distances, out_distances, self.cfg.margin_quantile, self.cfg.margin_scale,
                                  self.cfg.pull_digits)
        total = self.cfg.weight * loss
        if self.profile is not None:
            profile, profile_parts = self.profile.term(in_distances, in_logits, out_distances, out_logits,
                                                       self.cfg.margin_quantile)
            total = total + self.cfg.profile_weight * profile
            parts |= profile_parts
        if self.cfg.uniform_weight > 0:
            uniform = -F.log_softmax(out_logits, dim=1).mean()
            total = total + self.cfg.uniform_weight * uniform
            parts["oe_uniform"] = float(uniform.detach())
        return total, parts

    @torch.no_grad()
    def validation(self, model: nn.Module, val_digits: torch.Tensor, batch_size: int) -> dict:
        """On the held-out fonts/classes against the validation digits, by the nearest-prototype distance:
        AUROC, FPR at 95% TPR, and the share of outliers beyond the digits' 99% quantile."""
        was_training = model.training
        model.eval()
        digits = _nearest(model, val_digits, batch_size, self.device)
        outliers = _nearest(model, self.val_images, batch_size, self.device)
        model.train(was_training)
        threshold = torch.quantile(outliers, 0.05)  # 95% of the outliers at or above it
        return {"oe_auroc": auroc(digits, outliers), "oe_fpr95": float((digits >= threshold).float().mean()),
                "oe_beyond_q99": float((outliers > torch.quantile(digits, 0.99)).float().mean())}


def oe_figures(m: dict) -> str:
    """The outlier-exposure figures of an epoch's metrics, for the log line ("" without it)."""
    if "val_oe_auroc" not in m:
        return ""
    return (f"  OE {m['train_oe_margin_loss']:.4f} (inside {m['train_oe_inside_margin']:.2f}), held-out outliers "
            f"AUROC {m['val_oe_auroc']:.4f} FPR95 {m['val_oe_fpr95']:.3f}")


def margin_term(in_distances: torch.Tensor, out_distances: torch.Tensor, quantile: float = 0.99,
                scale: float = 1.0, pull_digits: bool = True) -> tuple[torch.Tensor, dict]:
    """mean relu(1 - d_min(outlier) / margin), margin = scale * quantile of the in-domain nearest distances.

    The margin's value is that quantile. With pull_digits its gradient is that of the in-domain mean (the
    quantile over the mean, detached, times the mean): a fixed margin would be met by stretching the whole
    latent space (every distance, the digits' too, grows), which the score does not reward; this way the
    ratio is what counts, and the term also pulls the digits towards their prototypes. Without it the
    margin is a constant of the step: only the outliers move, and the next step's margin follows any
    stretching, since it is measured on the digits again."""
    inside = in_distances.min(dim=1).values
    if pull_digits:
        ratio = torch.quantile(inside.detach(), quantile) / inside.detach().mean().clamp_min(1e-12)
        margin = (scale * ratio * inside.mean()).clamp_min(1e-6)
    else:
        margin = (scale * torch.quantile(inside.detach(), quantile)).clamp_min(1e-6)
    nearest = out_distances.min(dim=1).values
    loss = F.relu(1.0 - nearest / margin).mean()
    return loss, {"oe_margin_loss": float(loss.detach()), "oe_margin": float(margin.detach()),
                  "oe_inside_margin": float((nearest.detach() < margin).float().mean())}


class ProfileMargin:
    """A margin on what the served score's prototype_mahalanobis part reads (profile_weight): each
    outlier's squared Mahalanobis distance of its L2 distance profile, from its predicted class's mean,
    pushed above the margin_quantile of the digits' own, as export/calibration.py fits it (class means by
    predicted label, one shared covariance). The means and covariance are running averages of the
    digits' profiles (momentum), detached: only the outliers are pushed. They are part of a run's
    training state (state_dict), so a resumed run goes on with them."""

    def __init__(self, n_classes: int, momentum: float = 0.05, shrinkage: float = 1e-3):
        self.n_classes, self.momentum, self.shrinkage = n_classes, momentum, shrinkage
        self.means: torch.Tensor | None = None
        self.covariance: torch.Tensor | None = None

    def state_dict(self) -> dict:
        return {"means": self.means, "covariance": self.covariance}

    def load_state_dict(self, state: dict) -> None:
        self.means, self.covariance = state["means"], state["covariance"]

    @torch.no_grad()
    def update(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        counts = torch.bincount(labels, minlength=self.n_classes).to(z.dtype)
        sums = torch.zeros(self.n_classes, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, labels, z)
        present = counts > 0
        batch_means = sums[present] / counts[present, None]
        if self.means is None:
            self.means = z.mean(dim=0).repeat(self.n_classes, 1)
        m = 1.0 if self.covariance is None else self.momentum
        self.means[present] = (1 - m) * self.means[present] + m * batch_means
        r = z - self.means[labels]
        batch_cov = r.T @ r / len(z)
        self.covariance = batch_cov if self.covariance is None else (
            (1 - self.momentum) * self.covariance + self.momentum * batch_cov)

    def precision(self) -> torch.Tensor:
        cov = self.covariance
        ridge = self.shrinkage * cov.diagonal().mean().clamp_min(1e-12)
        return torch.linalg.inv(cov + ridge * torch.eye(len(cov), dtype=cov.dtype, device=cov.device))

    def squared(self, z: torch.Tensor, labels: torch.Tensor, precision: torch.Tensor | None = None) -> torch.Tensor:
        """[N] (z - mean_label)' P (z - mean_label); P: self.precision() unless given."""
        r = z - self.means[labels]
        return (r @ (self.precision() if precision is None else precision) * r).sum(dim=1)

    def term(self, in_distances: torch.Tensor, in_logits: torch.Tensor, out_distances: torch.Tensor,
             out_logits: torch.Tensor, quantile: float) -> tuple[torch.Tensor, dict]:
        z_in = in_distances.detach().clamp_min(0).sqrt().double()
        labels_in = in_logits.detach().argmax(dim=1)
        self.update(z_in, labels_in)
        precision = self.precision()  # of the detached running covariance: one inverse per step
        with torch.no_grad():
            margin = torch.quantile(self.squared(z_in, labels_in, precision), quantile).clamp_min(1e-6)
        z_out = out_distances.clamp_min(1e-12).sqrt().double()
        m_out = self.squared(z_out, out_logits.detach().argmax(dim=1), precision)
        loss = F.relu(1.0 - m_out / margin).mean().float()
        return loss, {"oe_profile_loss": float(loss.detach()), "oe_profile_margin": float(margin),
                      "oe_profile_inside": float((m_out.detach() < margin).float().mean())}


def _rows(output, rows: slice):
    """The rows of a model output (a dataclass of per-image tensors)."""
    return dataclasses.replace(output, **{f.name: getattr(output, f.name)[rows] for f in dataclasses.fields(output)
                                          if isinstance(getattr(output, f.name), torch.Tensor)})


@contextlib.contextmanager
def running_batchnorm(model: nn.Module):
    """Batch-norm layers in eval mode (running statistics, not updated) for the duration."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in layers:
        m.eval()
    try:
        yield
    finally:
        for m in layers:
            m.train()


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """P(an outside score > an inside score), ties counted half (Mann-Whitney U)."""
    scores = torch.cat([inside, outside]).double()
    ranks = torch.empty_like(scores)
    order = scores.argsort()
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average ranks of ties
    uniq, inverse = torch.unique(scores, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    n_in, n_out = len(inside), len(outside)
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2
    return float(u / (n_in * n_out))


def _nearest(model: nn.Module, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch_size].to(device)).distances.min(dim=1).values.cpu()
                      for i in range(0, len(images), batch_size)])


def _equal_share(outliers: OutlierSet) -> np.ndarray:
    source = np.array([u.split(":")[0] for u in outliers.units])
    weights = np.zeros(len(outliers), np.float64)
    present = [s for s in SOURCES if (source == s).any()]
    for s in present:
        weights[source == s] = 1.0 / (source == s).sum() / len(present)
    return weights
