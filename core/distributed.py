"""The process group of a training job: one process without torchrun, DDP under it.

torchrun (or a test) sets WORLD_SIZE > 1, RANK and LOCAL_RANK; every process then joins the group
(NCCL on GPUs, gloo on the CPU) and uses GPU LOCAL_RANK.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's place in the job (world size 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """Join the process group when torchrun (or a test) set WORLD_SIZE > 1: NCCL on GPUs, gloo
    on the CPU. Each process uses GPU `LOCAL_RANK`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world <= 1:
        return Dist(device=dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def broadcast_object(value: Any, d: Dist) -> Any:
    """Rank 0's value on every rank."""
    if d.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ok(ok: bool, d: Dist) -> bool:
    """Whether `ok` holds on every rank (so all ranks stop together)."""
    if d.world_size == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(flag)
    return int(flag.item()) == 0
