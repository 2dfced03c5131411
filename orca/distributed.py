"""One process per GPU under ``torchrun``: who am I, which device, and who may write.

    torchrun --standalone --nproc_per_node=2 -m orca stage3 --config configs/darcy_swinb.yaml

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them (plain ``python``) every
helper here is a no-op for a world of one, so the single-process path runs no collective at all.
The process group is NCCL on CUDA and gloo on CPU (gloo is what the tests use).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Tuple

import torch
import torch.distributed as dist

from orca.schema import ConfigError


@dataclass
class Dist:
    """This process's place in the job.

    Args:
        rank: global rank (0 writes files, prints and evaluates).
        world: number of processes.
        local_rank: index of this process's GPU on its host.
        owns_group: whether :func:`setup_distributed` created the process group (and must destroy it).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects only)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0, then on the others: caches built by ``fn`` are written once, not raced."""
        if not self.main:
            self.barrier()
        out = fn()
        if self.main:
            self.barrier()
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def world_from_env() -> Tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def setup_distributed(batch_size: int, device: torch.device) -> Tuple[Dist, torch.device]:
    """Join the torchrun job (if any) and pick this rank's device.

    Args:
        batch_size: the global batch (``train.batch_size``); each rank takes ``batch_size / world``.
        device: the configured device (``cuda`` becomes ``cuda:LOCAL_RANK``).

    Raises:
        ConfigError: the world size does not divide the global batch (checked before any collective,
            so every rank fails with the same message instead of hanging).
    """
    rank, world, local = world_from_env()
    if world <= 1:
        return Dist(), device
    if batch_size % world:
        raise ConfigError(f"train.batch_size={batch_size} is not divisible by world size {world}: the global "
                          f"batch is split evenly over the processes; choose a multiple of {world}")
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        # device_id binds NCCL to this rank's GPU up front (barriers otherwise guess the device).
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                                device_id=device if cuda else None)
    return Dist(rank, world, local, owns), device
