"""What every trainer shares: exact resume (optimizers, schedulers, RNGs, best accuracy, wall time),
the files an epoch leaves in the run directory, the device, and the ETA's format; and `protoserve
ship`, which copies a finished run into a shipped model folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.config import Config


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ResumableRun:
    """Exact resume for a trainer: its optimizers and schedulers (named by optimizer_states()),
    the data-order and augmentation RNGs, the best validation accuracy and the wall time so far; and
    the files an epoch leaves (metrics.jsonl, last.pt, best.pt, checkpoints/)."""

    rank = 0

    @property
    def kept_model(self):
        """The model that best.pt and the epoch checkpoints hold."""
        return self.model

    def optimizer_states(self) -> dict:
        raise TypeError(f"{type(self).__name__} must name its optimizers and schedulers")

    def training_state(self) -> dict:
        return {
            **{name: obj.state_dict() for name, obj in self.optimizer_states().items()},
            "shuffle_rng": self.shuffle_rng.get_state(),
            "augment_rng": self.augment_rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "best_val_accuracy": self.best_val_accuracy,
            "wall_seconds": self.wall_seconds,
        }

    def _write(self, metrics: dict, is_best: bool) -> None:
        # Metrics first: on resume, lines past the checkpoint's epoch are dropped, so a crash
        # between the two writes neither loses nor duplicates an epoch.
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        state = self.training_state()
        save_checkpoint(self.out_dir / "last.pt", self.model, self.config, self.epoch, metrics, state)
        if is_best:
            save_checkpoint(self.out_dir / "best.pt", self.kept_model, self.config, self.epoch, metrics, state)
        if keeps_epoch_checkpoint(self.config, self.epoch):
            save_checkpoint(epoch_checkpoint(self.out_dir, self.epoch), self.kept_model, self.config, self.epoch,
                            metrics, state)

    def resume(self) -> None:
        path = self.out_dir / "last.pt"
        model, config, payload = load_checkpoint(path, expect_config=self.config)
        if _semantic(config) != _semantic(self.config):
            raise CheckpointError(f"{path}: the run was started with a different config; "
                                  f"resume with {self.out_dir / 'config.yaml'}")
        state = payload["training_state"]
        if state is None:
            raise CheckpointError(f"{path}: holds no optimizer/RNG state, cannot resume from it")
        self.model.load_state_dict(model.state_dict())
        for name, obj in self.optimizer_states().items():
            obj.load_state_dict(state[name])
        self.shuffle_rng.set_state(state["shuffle_rng"])
        self.augment_rng.set_state(state["augment_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.best_val_accuracy = state["best_val_accuracy"]
        self.wall_seconds = state["wall_seconds"]
        self.epoch = payload["epoch"]
        if self.rank == 0:
            self._truncate_metrics(self.epoch)
        self.log(f"resumed {path} at epoch {self.epoch}")

    def _truncate_metrics(self, epoch: int) -> None:
        """Drop metric lines of epochs after the checkpoint (written before a crash)."""
        path = self.out_dir / "metrics.jsonl"
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln)["epoch"] <= epoch]
            path.write_text("".join(ln + "\n" for ln in kept))


def load_initial_weights(model: torch.nn.Module, config: Config, log=print) -> None:
    """train.init_from: start from that checkpoint's weights (same family and shapes; its own config
    must match the run's model section), with fresh optimizers and schedules: a fine-tune."""
    path = config.train.init_from
    if not path:
        return
    source, source_config, payload = load_checkpoint(Path(path))
    if source_config.model != config.model:
        raise CheckpointError(f"{path}: its model config differs from the run's; a fine-tune keeps the model "
                              "section of the checkpoint it starts from")
    model.load_state_dict(source.state_dict())
    log(f"started from {path} (epoch {payload['epoch']})")


def _semantic(config: Config) -> dict:
    """The config without the settings that only say where and how fast to run."""
    d = config.to_dict()
    for key in ("device", "num_threads", "eval_batch_size"):
        d["train"].pop(key)
    return d


def keeps_epoch_checkpoint(config: Config, epoch: int) -> bool:
    """Whether a run of `config` writes checkpoints/epoch_NNNN.pt after `epoch`: every
    train.checkpoint_every epochs, and the last."""
    return epoch % config.train.checkpoint_every == 0 or epoch == config.train.epochs


def epoch_checkpoint(run: Path, epoch: int) -> Path:
    """Where a run keeps its checkpoint of `epoch`."""
    return Path(run) / "checkpoints" / f"epoch_{epoch:04d}.pt"


def duration(seconds: float) -> str:
    """Seconds as 0h00m00s."""
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def ship_run(run: Path, out: Path, checkpoint: str = "best.pt", average_from: int | None = None) -> Path:
    """Copy a finished run into a model folder (`protoserve ship`):

        <out>/checkpoint.pt    the run's `checkpoint` (best.pt: the best validation accuracy) without
                               optimizer state: the weights, config, epoch and metrics; with
                               `average_from`, the mean of the run's epoch checkpoints from that
                               epoch to the last (a weight average over the schedule's tail)
        <out>/config.yaml      the run's config
        <out>/metrics.jsonl    one line per epoch
        <out>/push/            ProtoPNet: the pictures of the push that produced checkpoint.pt
    """
    run, out = Path(run), Path(out)
    if average_from is None:
        model, config, payload = load_checkpoint(run / checkpoint)
    else:
        model, config, payload = average_run(run, average_from)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "checkpoint.pt", model, config, payload["epoch"], payload["metrics"], None)
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copyfile(run / name, out / name)
    if (run / "push").is_dir():
        shutil.rmtree(out / "push", ignore_errors=True)
        shutil.copytree(run / "push" / f"epoch_{payload['epoch']:04d}", out / "push")
    return out / "checkpoint.pt"


def average_run(run: Path, first_epoch: int) -> tuple:
    """The uniform mean of a finished run's epoch checkpoints (checkpoints/epoch_NNNN.pt: the kept
    weights, the moving average when the run keeps one) from `first_epoch` to the run's last epoch:
    stochastic weight averaging over the tail of the schedule. Returns (model, config, payload) like
    load_checkpoint; the payload's metrics name the epochs averaged. Refuses an unfinished run, a gap
    in the checkpoints, and a family whose prototypes are pushed onto training patches (their mean is
    no patch)."""
    run = Path(run)
    config = load_checkpoint(run / "last.pt")[1]
    last = config.train.epochs
    epochs = [e for e in range(max(first_epoch, 1), last + 1) if keeps_epoch_checkpoint(config, e)]
    if not epochs:
        raise CheckpointError(f"{run}: no epoch checkpoint from epoch {first_epoch} to the last ({last})")
    if config.model.family != "prototypedl":
        raise CheckpointError(f"{run}: a {config.model.family} run's prototypes are pushed onto training "
                              "patches; a mean of them is no patch, so only prototypedl runs are averaged")
    total, payload = None, None
    for epoch in epochs:
        path = epoch_checkpoint(run, epoch)
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; averaging needs every epoch checkpoint from "
                                  f"{epochs[0]} to {last} (has the run finished?)")
        model, _, payload = load_checkpoint(path, expect_config=config)
        state = model.state_dict()
        total = ({k: v.double() for k, v in state.items()} if total is None
                 else {k: total[k] + v.double() for k, v in state.items()})
    model.load_state_dict({k: (v / len(epochs)).to(state[k].dtype) for k, v in total.items()})
    payload = {**payload, "metrics": {"weight_average_of_epochs": epochs}}
    return model, config, payload
