"""The training processes: one, or data-parallel under torchrun (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK`` from the environment; gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from fmapicon.errors import UserError


@dataclass
class Processes:
    """Where this process stands among the training processes (torchrun's environment)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialized the process group, so we destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_processes(device_name: str):
    """(Processes, torch.device): one process, or DDP from torchrun's WORLD_SIZE / RANK /
    LOCAL_RANK (gloo on CPU, nccl on CUDA)."""
    import torch
    import torch.distributed as dist

    from fmapicon.runtime import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return Processes(), resolve_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


def close_processes(processes: Processes) -> None:
    import torch.distributed as dist

    if processes.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(processes: Processes) -> None:
    if processes.distributed:
        import torch.distributed as dist

        dist.barrier()


def rank_zero_error(processes: Processes, work) -> None:
    """Run ``work`` on rank 0 and raise its UserError on every rank (so none waits forever)."""
    message = None
    if processes.main:
        try:
            work()
        except UserError as error:
            message = str(error)
    if processes.distributed:
        import torch.distributed as dist

        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise UserError(message)
