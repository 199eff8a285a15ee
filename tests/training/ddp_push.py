"""Run by test_distributed.py under torchrun: push a seeded ProtoPNet with the push set split across ranks.

    torchrun --nproc_per_node 2 tests/training/ddp_push.py <mnist root> <n images> <out.pt>
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from training.config import Config  # noqa: E402
from training.distributed import init_distributed, shutdown_distributed  # noqa: E402
from training.mnist import load_mnist  # noqa: E402
from training.protopnet import ProtoPNet  # noqa: E402
from training.push import push_prototypes  # noqa: E402

PUSH_CONFIG = {"family": "protopnet", "n_prototypes": 20, "prototype_dim": 8}


def seeded_model() -> ProtoPNet:
    torch.manual_seed(0)
    return ProtoPNet(Config.from_dict({"model": PUSH_CONFIG}).model).eval()


def main() -> None:
    root, n, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    assert init_distributed("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    train = load_mnist(root, val_size=500, train_subset=n)["train"]
    model = seeded_model()
    shard = torch.arange(len(train))[rank::world]
    push_prototypes(model, train.images[shard], train.labels[shard], shard, batch_size=64,
                    source_images=lambda i: train.images[i])
    if rank == 0:
        torch.save({k: v for k, v in model.state_dict().items()
                    if k in ("prototypes", "push_source", "push_rf_box", "push_activation_box")}, out)
    shutdown_distributed()


if __name__ == "__main__":
    main()
