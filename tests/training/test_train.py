import json

import pytest
import torch
from tiny_configs import tiny_config_dict

from training.checkpoint import CheckpointError, load_checkpoint
from training.config import Config
from training.train_prototypedl import PrototypeDLTrainer, lr_lambda


def _trainer(config_dict, out, mnist_root):
    return PrototypeDLTrainer(Config.from_dict(config_dict), out, data_root=mnist_root, log=lambda s: None)


def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path, mnist_root):
    # Augmentation and a cosine schedule on, so every piece of state has to come back.
    cfg = tiny_config_dict(epochs=2, elastic=True, schedule="cosine", warmup_epochs=0.5)
    straight = _trainer(cfg, tmp_path / "straight", mnist_root)
    straight.fit()

    _trainer(cfg, tmp_path / "split", mnist_root).fit(stop_after=1)  # as if interrupted
    resumed = _trainer(cfg, tmp_path / "split", mnist_root)
    resumed.resume()
    assert resumed.epoch == 1
    resumed.fit()

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_resume_drops_metric_lines_past_the_checkpoint(tmp_path, mnist_root):
    cfg = tiny_config_dict(epochs=2)
    _trainer(cfg, tmp_path, mnist_root).fit(stop_after=1)
    with open(tmp_path / "metrics.jsonl", "a") as f:  # as if killed after metrics, before last.pt
        f.write(json.dumps({"epoch": 2}) + "\n")
    resumed = _trainer(cfg, tmp_path, mnist_root)
    resumed.resume()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_resume_with_another_config_is_refused(tmp_path, mnist_root):
    _trainer(tiny_config_dict(epochs=1), tmp_path, mnist_root).fit()
    other = _trainer(tiny_config_dict(epochs=1, lr=0.01), tmp_path, mnist_root)
    with pytest.raises(CheckpointError, match="different config"):
        other.resume()


def test_checkpoints_every_n_and_best_on_validation(tmp_path, mnist_root):
    cfg = tiny_config_dict(epochs=3, checkpoint_every=2)
    trainer = _trainer(cfg, tmp_path, mnist_root)
    trainer.fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_0002.pt", "epoch_0003.pt"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"train_E", "train_R", "train_R1", "train_R2", "val_accuracy", "lr", "wall_seconds"} <= set(rows[0])
    best_epoch = max(rows, key=lambda r: r["val_accuracy"])["epoch"]
    _, _, payload = load_checkpoint(tmp_path / "best.pt")
    assert payload["epoch"] == best_epoch
    assert "test_accuracy" not in json.dumps(rows)  # model selection never sees the test set


def test_cosine_schedule_warms_up_and_decays():
    cfg = Config.from_dict({"train": {"epochs": 10, "schedule": "cosine", "warmup_epochs": 1}}).train
    f = lr_lambda(cfg, steps_per_epoch=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=0.02) and f(99) < 0.01


@pytest.mark.slow
def test_short_training_beats_chance_by_a_wide_margin(tmp_path, mnist_root):
    cfg = tiny_config_dict(epochs=3, elastic=True, schedule="cosine", warmup_epochs=0.2, num_threads=2)
    cfg["data"]["train_subset"] = 3000
    cfg["data"]["val_size"] = 1000
    trainer = _trainer(cfg, tmp_path, mnist_root)
    metrics = trainer.fit()
    assert metrics["val_accuracy"] > 0.75  # chance is 0.10
    assert metrics["train_R"] < json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["train_R"] * 1.01
