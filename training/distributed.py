"""torch.distributed set-up for `torchrun`: one process per GPU (NCCL) or per CPU worker (gloo).

    torchrun --nproc_per_node 2 -m cli.main train --config configs/protopnet_mnist.yaml

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK and the rendezvous address; ProtoPNetTrainer then finds
the process group initialised and shards minibatches and the push set across ranks.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str = "cpu") -> bool:
    """Join the process group torchrun describes; False (and nothing done) outside torchrun."""
    if not launched_by_torchrun() or dist.is_initialized():
        return dist.is_initialized()
    use_cuda = device in ("cuda", "auto") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return True


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
