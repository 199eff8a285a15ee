"""ProtoPNet under torchrun with two CPU processes (gloo): push gathers across ranks, training runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_configs import tiny_protopnet_dict

from training.checkpoint import load_checkpoint
from training.mnist import load_mnist
from training.push import push_prototypes

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_push_across_two_ranks_picks_the_same_prototypes_as_one_process(tmp_path, mnist_root):
    sys.path.insert(0, str(HERE))
    from ddp_push import seeded_model

    torchrun(str(HERE / "ddp_push.py"), str(mnist_root), "300", str(tmp_path / "ddp.pt"))
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)

    train = load_mnist(mnist_root, val_size=500, train_subset=300)["train"]
    single = seeded_model()
    push_prototypes(single, train.images, train.labels, batch_size=64)
    assert torch.equal(ddp["push_source"], single.push_source)
    assert torch.equal(ddp["push_rf_box"], single.push_rf_box)
    assert torch.equal(ddp["push_activation_box"], single.push_activation_box)
    torch.testing.assert_close(ddp["prototypes"], single.prototypes.detach(), rtol=0, atol=1e-6)
    # Both ranks held candidates: the winners come from both halves of the push set (even and odd indices).
    assert {int(i) % 2 for i in single.push_source[:, 0]} == {0, 1}


@pytest.mark.slow
def test_protopnet_trains_under_torchrun(tmp_path, mnist_root):
    cfg = tiny_protopnet_dict()
    cfg["train"]["epochs"] = 2
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    torchrun("-m", "cli.main", "train", "--config", str(tmp_path / "c.yaml"), "--out", str(out),
             "--data-root", str(mnist_root))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # written once, by rank 0
    model, _, _ = load_checkpoint(out / "best.pt")
    assert rows[-1]["push_purity"] == 1.0 and (model.push_source[:, 0] >= 0).all()
    assert rows[-1]["val_accuracy"] > 0.2  # it learned something in two tiny epochs
