"""The ProtoPNet training loop: warm-up, joint training, push every N epochs, last-layer optimisation.

    epoch 1 .. warm_epochs     add-on layers and prototypes (backbone and last layer frozen)
    later epochs               joint: backbone, add-on layers, prototypes (last layer frozen);
                               learning rates times lr_gamma every lr_step_epochs joint epochs
    after epoch push_start, every push_every epochs after it, and after the last epoch:
        push                   each prototype onto its nearest own-class patch of the push set
                               (the unaugmented training images), pictures to push/epoch_NNNN/
        last layer             last_layer_epochs passes of CE + lambda_l1 * L1 over the push
                               set's similarities (features are frozen, so they are computed once)

Model selection: best.pt is the pushed model (after its last-layer optimisation) with the best
validation accuracy; the test set is never looked at. The run directory is the PrototypeDL one
(config.yaml, metrics.jsonl, last.pt, best.pt, checkpoints/) plus push/.

Under `torchrun` (torch.distributed initialised by the caller, see training/distributed.py) every
rank holds the data, trains on its share of each minibatch through DistributedDataParallel,
searches its shard of the push set (push gathers the candidates across ranks), and only rank 0
writes files.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel

from training.checkpoint import build_model
from training.config import Config, ConfigError
from training.datasets import dataset, input_normalization, load_run_data
from training.elastic import elastic_deform, faded_alpha
from training.evaluate import accuracy, evaluate_protopnet
from training.families import Family, register_family
from training.outlier_exposure import OutlierExposure, oe_figures
from training.protopnet import (
    ProtoPNet,
    build,
    config_checks,
    graph_forward,
    graph_outputs,
    l1_wrong_class,
    protopnet_loss,
)
from training.push import (
    object_overlaps,
    push_prototypes,
    push_purity,
    pushed_prototype_records,
    write_push_pictures,
)
from training.resumable import ResumableRun, duration, load_initial_weights, resolve_device
from training.splits import Split, resolve_data_root


class ProtoPNetTrainer(ResumableRun):
    def __init__(self, config: Config, out_dir: Path, data_root: Path | None = None, log=print):
        self.config, self.out_dir = config, Path(out_dir)
        t, s = config.train, config.schedule
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.log = log if self.rank == 0 else (lambda message: None)
        self.device = resolve_device(t.device)
        root = data_root or resolve_data_root(None, config.data.root)
        self.data = load_run_data(config, root)
        self.mean, self.std = input_normalization(config.data.dataset)
        self.elastic = t.elastic and dataset(config.data.dataset).elastic
        torch.manual_seed(t.seed)
        self.model: ProtoPNet = build_model(config).to(self.device)
        load_initial_weights(self.model, config, self.log)
        if config.outlier_exposure.weight > 0 and self.world > 1:
            # two forward passes per step through one DistributedDataParallel wrapper: not built or tested
            raise ConfigError("outlier_exposure is not supported under torchrun yet; train on one process")
        self.oe = (OutlierExposure(config, self.device, self.mean, self.std, log=self.log)
                   if config.outlier_exposure.weight > 0 else None)
        m = self.model
        self.warm_optimizer = torch.optim.Adam([
            {"params": m.add_on.parameters(), "lr": s.lr_add_on},
            {"params": [m.prototypes], "lr": s.lr_prototypes}])
        self.joint_optimizer = torch.optim.Adam([
            {"params": m.features.parameters(), "lr": s.lr_features},
            {"params": m.add_on.parameters(), "lr": s.lr_add_on},
            {"params": [m.prototypes], "lr": s.lr_prototypes}])
        self.joint_scheduler = torch.optim.lr_scheduler.StepLR(self.joint_optimizer, s.lr_step_epochs, s.lr_gamma)
        self.last_layer_optimizer = torch.optim.Adam(m.last_layer.parameters(), lr=s.lr_last_layer)
        self.shuffle_rng = torch.Generator().manual_seed(t.seed + 1)
        self.augment_rng = torch.Generator(device=self.device).manual_seed(t.seed + 2)
        self.epoch = 0
        self.best_val_accuracy = -1.0
        self.wall_seconds = 0.0
        self._ddp: DistributedDataParallel | None = None

    def optimizer_states(self) -> dict:
        return {"warm_optimizer": self.warm_optimizer, "joint_optimizer": self.joint_optimizer,
                "joint_scheduler": self.joint_scheduler, "last_layer_optimizer": self.last_layer_optimizer,
                **(self.oe.states() if self.oe is not None else {})}

    # -- stages ----------------------------------------------------------------------------
    def is_push_epoch(self, epoch: int) -> bool:
        s = self.config.schedule
        regular = epoch >= s.push_start and (epoch - s.push_start) % s.push_every == 0
        return regular or epoch == self.config.train.epochs

    def _set_trainable(self, phase: str) -> None:
        m = self.model
        # Under DDP the backbone keeps its gradients in warm-up too (one wrapper serves both phases,
        # and DDP waits for every parameter it was built with); the warm optimizer never steps it.
        for p in m.features.parameters():
            p.requires_grad_(phase == "joint" or (phase == "warm" and self.world > 1))
        for p in m.add_on.parameters():
            p.requires_grad_(phase in ("warm", "joint"))
        m.prototypes.requires_grad_(phase in ("warm", "joint"))
        m.last_layer.weight.requires_grad_(phase == "last_layer")

    def _forward_module(self):
        """The model, or under torch.distributed its DDP wrapper (backbone, add-on, prototypes)."""
        if self.world == 1:
            return self.model
        if self._ddp is None:
            self._ddp = DistributedDataParallel(self.model)
        return self._ddp

    def _local(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's share of a minibatch (all of it when it is smaller than the world)."""
        return idx[self.rank::self.world] if len(idx) >= self.world else idx

    def train_epoch(self, phase: str) -> dict:
        t = self.config.train
        train = self.data["train"]
        self._set_trainable(phase)
        optimizer = self.warm_optimizer if phase == "warm" else self.joint_optimizer
        module = self._forward_module()
        self.model.train()
        alpha = faded_alpha(t.elastic_alpha, self.epoch, t.epochs, t.elastic_fade_epochs)
        order = torch.randperm(len(train), generator=self.shuffle_rng)
        sums, correct, seen = {}, 0, 0
        for step, start in enumerate(range(0, len(train), t.batch_size)):
            idx = self._local(order[start:start + t.batch_size])
            x = train.images[idx].to(self.device)
            y = train.labels[idx].to(self.device)
            if self.elastic:
                x = elastic_deform(x, t.elastic_sigma, alpha, generator=self.augment_rng, affine=t.affine)
            if self.oe is not None:
                xo = self.oe.batch(self.epoch, step, (t.elastic_sigma, alpha) if self.elastic else None,
                                   self.augment_rng)
                out, out_o = self.oe.forward_both(module, x, xo)
            else:
                out = module(x)
            terms = protopnet_loss(out, y, self.model, self.config.loss)
            total, floats = terms.total, terms.as_floats()
            if self.oe is not None:
                oe_loss, oe_parts = self.oe.term(out.distances, out_o.distances, out_o.logits, out.logits)
                total = total + oe_loss
                floats.update(oe_parts)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            for k, v in floats.items():
                sums[k] = sums.get(k, 0.0) + v * len(y)
            correct += int((out.logits.argmax(1) == y).sum())
            seen += len(y)
        return {**{f"train_{k}": v / seen for k, v in sums.items()}, "train_accuracy": correct / seen}

    def push(self, epoch: int) -> dict:
        train = self.data["train"]
        shard = torch.arange(len(train))[self.rank::self.world]
        result = push_prototypes(self.model, _Subset(train.images, shard), train.labels[shard], shard,
                                 batch_size=self.config.train.eval_batch_size,
                                 source_images=lambda i: train.images[i])
        if self.rank == 0:
            write_push_pictures(self.model, lambda i: train.images[i], self.out_dir / "push" / f"epoch_{epoch:04d}",
                                self.mean, self.std)
        stats = {"push_purity": push_purity(self.model, train.labels),
                 "push_mean_distance": float(result.distances.mean())}
        overlaps = [v for v in object_overlaps(self.model, train.images) if v is not None]
        if overlaps:  # CUB with segmentations: how much of each prototype's activation box is the bird
            stats["push_object_overlap"] = float(np.mean(overlaps))
            stats["push_on_background"] = sum(v < 0.5 for v in overlaps)
        return stats

    @torch.no_grad()
    def _similarities(self, split: Split, shard: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        bs = self.config.train.eval_batch_size
        parts = [self.model(split.images[shard[i:i + bs]].to(self.device)).similarities
                 for i in range(0, len(shard), bs)]
        return torch.cat(parts) if parts else torch.empty(0, self.model.prototypes.shape[0])

    def last_layer(self) -> dict:
        """Optimise the last layer alone on the push set's similarities (computed once: nothing before
        the last layer changes). Gradients are summed over ranks, each rank holding a shard."""
        s, t = self.config.schedule, self.config.train
        train = self.data["train"]
        self._set_trainable("last_layer")
        shard = torch.arange(len(train))[self.rank::self.world]
        sims, labels = self._similarities(train, shard), train.labels[shard].to(self.device)
        W = self.model.last_layer.weight
        local_batch = max(1, t.batch_size // self.world)
        steps = math.ceil(len(train) / t.batch_size)
        for _ in range(s.last_layer_epochs):
            order = torch.randperm(len(shard), generator=self.shuffle_rng)
            for step in range(steps):
                idx = order[step * local_batch:(step + 1) * local_batch]
                ce = F.cross_entropy(sims[idx] @ W.T, labels[idx], reduction="sum") / max(1, len(idx) * self.world)
                loss = ce + self.config.loss.lambda_l1 * l1_wrong_class(self.model) / self.world
                self.last_layer_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.world > 1:
                    dist.all_reduce(W.grad)
                self.last_layer_optimizer.step()
        self._set_trainable("none")
        return {"last_layer_l1": float(l1_wrong_class(self.model).detach())}

    def val_accuracy(self) -> float:
        return accuracy(self.model, self.data["val"], self.config.train.eval_batch_size, self.device)

    # -- the loop --------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> dict:
        t, s = self.config.train, self.config.schedule
        last = min(t.epochs, stop_after or t.epochs)
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        metrics = {}
        while self.epoch < last:
            started = time.perf_counter()
            epoch = self.epoch + 1
            phase = "warm" if epoch <= s.warm_epochs else "joint"
            lrs = [g["lr"] for g in (self.warm_optimizer if phase == "warm" else self.joint_optimizer).param_groups]
            metrics = {"epoch": epoch, "phase": phase, "lr": lrs[0], **self.train_epoch(phase)}
            if phase == "joint":
                self.joint_scheduler.step()
            metrics["val_accuracy_before_push"] = self.val_accuracy()
            pushed = self.is_push_epoch(epoch)
            if pushed:
                metrics.update(self.push(epoch))
                metrics["val_accuracy_after_push"] = self.val_accuracy()
                metrics.update(self.last_layer())
            metrics["val_accuracy"] = self.val_accuracy()
            if self.oe is not None:
                metrics.update({f"val_{k}": v for k, v in self.oe.validation(
                    self.model, self.data["val"].images, t.eval_batch_size).items()})
            metrics["pushed"] = pushed
            self.epoch = epoch
            seconds = time.perf_counter() - started
            self.wall_seconds += seconds
            metrics.update(epoch_seconds=seconds, wall_seconds=self.wall_seconds)
            is_best = pushed and metrics["val_accuracy"] > self.best_val_accuracy
            if is_best:
                self.best_val_accuracy = metrics["val_accuracy"]
            self._log_epoch(metrics, is_best)
            if self.rank == 0:
                self._write(metrics, is_best)
        return metrics

    def _log_epoch(self, m: dict, is_best: bool) -> None:
        eta = (self.config.train.epochs - self.epoch) * m["epoch_seconds"]
        on_object = (f", on the object {m['push_object_overlap']:.2f} ({m['push_on_background']} mostly background)"
                     if "push_object_overlap" in m else "")
        push = (f"  push: purity {m['push_purity']:.2f}{on_object}, val acc {m['val_accuracy_after_push']:.4f} "
                f"-> last layer {m['val_accuracy']:.4f}" if m["pushed"] else "")
        self.log(f"epoch {self.epoch}/{self.config.train.epochs} ({m['phase']})  loss {m['train_total']:.4f} "
                 f"(CE {m['train_cross_entropy']:.4f} clst {m['train_cluster_cost']:.4f} "
                 f"sep {m['train_separation_cost']:.4f})  train acc {m['train_accuracy']:.4f}  "
                 f"val acc {m['val_accuracy_before_push']:.4f}{push}{oe_figures(m)}{' *' if is_best else ''}  "
                 f"{m['epoch_seconds']:.1f}s/epoch  ETA {duration(eta)}")


class _Subset:
    """images[shard] without materialising it (CUB images load from disk on indexing)."""

    def __init__(self, images, shard: torch.Tensor):
        self.images, self.shard = images, shard

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, index):
        return self.images[self.shard[index]]


register_family(Family(
    name="protopnet", build=build,
    trainer=ProtoPNetTrainer, evaluate=evaluate_protopnet,
    distributed=True, graph_outputs=graph_outputs, graph_forward=graph_forward,
    encode=lambda model, x: model.latent(x).flatten(2).transpose(1, 2), backbone=lambda model: model.features,
    decoder=lambda model: None, prototype_records=pushed_prototype_records,
    config_checks=config_checks, pictures=None,
    pictures_note="push writes each prototype's pictures into the run's push/epoch_NNNN/ folders, and the "
                  "bundle holds those of the exported model"))
