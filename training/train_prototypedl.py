"""The PrototypeDL training loop: a plain loop, one epoch at a time, resumable exactly
(training/resumable.py).

A run directory holds:
    config.yaml            the run's full config
    metrics.jsonl          one line per epoch (loss terms, accuracies, learning rate, wall time)
    last.pt                model + optimizer + scheduler + RNG state after the latest epoch
    best.pt                the epoch with the best validation accuracy (never the test set)
    checkpoints/epoch_NNNN.pt  every train.checkpoint_every epochs
"""

from __future__ import annotations

import copy
import math
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from training.checkpoint import build_model
from training.config import Config
from training.datasets import dataset, load_run_data
from training.elastic import elastic_deform, faded_alpha
from training.evaluate import evaluate_prototypedl
from training.families import Family, register_family
from training.outlier_exposure import OutlierExposure, oe_figures
from training.prototypedl import (
    PrototypeDL,
    PrototypeDLDecoder,
    graph_forward,
    graph_outputs,
    prototype_records,
    prototypedl_loss,
)
from training.resumable import ResumableRun, duration, load_initial_weights, resolve_device
from training.splits import Split, resolve_data_root
from training.visualize import prototypedl_figures


def lr_lambda(cfg, steps_per_epoch: int):
    """Learning-rate factor per optimizer step: constant, or linear warm-up then cosine."""
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if cfg.schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def validation_figures(model: PrototypeDL, split: Split, batch_size: int, device, loss_cfg) -> dict:
    """Accuracy and the mean loss terms on undeformed images (reconstruction error included), from one
    forward pass per batch (training/evaluate.accuracy is the same accuracy without the loss terms)."""
    model.eval()
    correct, sums, n = 0, {}, len(split)
    for start in range(0, n, batch_size):
        x = split.images[start:start + batch_size].to(device)
        y = split.labels[start:start + batch_size].to(device)
        out = model(x)
        correct += int((out.logits.argmax(1) == y).sum())
        for k, v in prototypedl_loss(out, x, y, loss_cfg).as_floats().items():
            sums[k] = sums.get(k, 0.0) + v * len(y)
    return {"accuracy": correct / n, **{k: v / n for k, v in sums.items()}}


class PrototypeDLTrainer(ResumableRun):
    def __init__(self, config: Config, out_dir: Path, data_root: Path | None = None, log=print):
        self.config, self.out_dir, self.log = config, Path(out_dir), log
        t = config.train
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        self.device = resolve_device(t.device)
        root = data_root or resolve_data_root(None, config.data.root)
        self.data = load_run_data(config, root)
        self.elastic = t.elastic and dataset(config.data.dataset).elastic
        torch.manual_seed(t.seed)
        self.model = build_model(config).to(self.device)
        load_initial_weights(self.model, config, log)
        self.oe = OutlierExposure(config, self.device, log=log) if config.outlier_exposure.weight > 0 else None
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=t.lr)
        self.steps_per_epoch = math.ceil(len(self.data["train"]) / t.batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t, self.steps_per_epoch))
        self.shuffle_rng = torch.Generator().manual_seed(t.seed + 1)
        self.augment_rng = torch.Generator(device=self.device).manual_seed(t.seed + 2)
        # The weights that are validated and kept as best.pt: the trained ones, or their moving average.
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if t.ema_decay > 0 else None
        self.epoch = 0
        self.best_val_accuracy = -1.0
        self.wall_seconds = 0.0

    def optimizer_states(self) -> dict:
        states = {"optimizer": self.optimizer, "scheduler": self.scheduler}
        if self.ema is not None:
            states["ema"] = self.ema
        if self.oe is not None:
            states |= self.oe.states()
        return states

    @property
    def kept_model(self):
        """The moving average when there is one: validation reads it and best.pt holds it."""
        return self.ema if self.ema is not None else self.model

    @torch.no_grad()
    def update_average(self) -> None:
        """ema <- d ema + (1 - d) weights, d ramped up over the first steps (as TensorFlow's
        ExponentialMovingAverage with num_updates) so the random start is forgotten quickly."""
        step = self.scheduler.last_epoch
        decay = min(self.config.train.ema_decay, (1 + step) / (10 + step))
        averaged = list(self.ema.parameters())
        torch._foreach_lerp_(averaged, list(self.model.parameters()), 1 - decay)

    # -- the loop --------------------------------------------------------------------------
    def train_epoch(self) -> dict:
        t, loss_cfg = self.config.train, self.config.loss
        train = self.data["train"]
        self.model.train()
        alpha = faded_alpha(t.elastic_alpha, self.epoch, t.epochs, t.elastic_fade_epochs)
        order = torch.randperm(len(train), generator=self.shuffle_rng)
        sums = {"total": 0.0, "E": 0.0, "R": 0.0, "R1": 0.0, "R2": 0.0}
        correct = 0
        bar = tqdm(range(0, len(train), t.batch_size), desc=f"epoch {self.epoch + 1}/{t.epochs}",
                   leave=False, file=sys.stderr, disable=not sys.stderr.isatty())
        for step, start in enumerate(bar):
            idx = order[start:start + t.batch_size]
            x = train.images[idx].to(self.device)
            y = train.labels[idx].to(self.device)
            if self.elastic:
                x = elastic_deform(x, t.elastic_sigma, alpha, generator=self.augment_rng, affine=t.affine)
            out = self.model(x)
            terms = prototypedl_loss(out, x, y, loss_cfg)
            total = terms.total
            if self.oe is not None:
                xo = self.oe.batch(self.epoch, step, (t.elastic_sigma, alpha) if self.elastic else None,
                                   self.augment_rng)
                out_o = self.oe.forward(self.model, xo)
                oe_loss, oe_parts = self.oe.term(out.distances, out_o.distances, out_o.logits, out.logits)
                total = total + oe_loss
                for k, v in oe_parts.items():
                    sums[k] = sums.get(k, 0.0) + v * len(y)
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.update_average()
            for k, v in terms.as_floats().items():
                sums[k] += v * len(y)
            correct += int((out.logits.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{float(terms.total.detach()):.3f}")
        n = len(train)
        return {**{f"train_{k}": v / n for k, v in sums.items()}, "train_accuracy": correct / n}

    def fit(self, stop_after: int | None = None) -> dict:
        """Train to train.epochs (or only up to epoch stop_after, as an interruption would)."""
        t = self.config.train
        last = min(t.epochs, stop_after or t.epochs)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        metrics = {}
        while self.epoch < last:
            started = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            metrics = self.train_epoch()
            val = validation_figures(self.kept_model, self.data["val"], t.eval_batch_size, self.device,
                                     self.config.loss)
            if self.oe is not None:
                val.update(self.oe.validation(self.kept_model, self.data["val"].images, t.eval_batch_size))
            self.epoch += 1
            seconds = time.perf_counter() - started
            self.wall_seconds += seconds
            metrics.update({f"val_{k}": v for k, v in val.items()})
            metrics.update(epoch=self.epoch, lr=lr, epoch_seconds=seconds, wall_seconds=self.wall_seconds)
            is_best = metrics["val_accuracy"] > self.best_val_accuracy
            if is_best:
                self.best_val_accuracy = metrics["val_accuracy"]
            self._log_epoch(metrics, is_best)
            self._write(metrics, is_best)
        return metrics

    def _log_epoch(self, m: dict, is_best: bool) -> None:
        eta = (self.config.train.epochs - self.epoch) * m["epoch_seconds"]
        self.log(f"epoch {self.epoch}/{self.config.train.epochs}  loss {m['train_total']:.4f} "
                 f"(E {m['train_E']:.4f} R {m['train_R']:.2f} R1 {m['train_R1']:.4f} R2 {m['train_R2']:.4f})  "
                 f"train acc {m['train_accuracy']:.4f}  val acc {m['val_accuracy']:.4f}"
                 f"{oe_figures(m)}{' *' if is_best else ''}  lr {m['lr']:.2e}  {m['epoch_seconds']:.1f}s/epoch  "
                 f"ETA {duration(eta)}")


register_family(Family(
    name="prototypedl", build=lambda config, initial_weights=True: PrototypeDL(config),
    trainer=PrototypeDLTrainer, evaluate=evaluate_prototypedl,
    distributed=False, graph_outputs=graph_outputs, graph_forward=graph_forward,
    encode=lambda model, x: model.encode(x)[:, None, :], backbone=lambda model: model.encoder,
    decoder=PrototypeDLDecoder, prototype_records=prototype_records,
    config_checks=lambda config: [], pictures=prototypedl_figures))
