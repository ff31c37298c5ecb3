"""The training processes: one, or data-parallel under torchrun (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK`` from the environment; gloo on CPU, nccl on CUDA).

Data-parallel training (``torchrun --nproc_per_node=K -m fmapicon train ...``):

When ``WORLD_SIZE`` > 1 the process group is initialized from the environment (gloo on
CPU, nccl on CUDA, device ``cuda:LOCAL_RANK``), ``batch`` is the global batch (each rank
takes ``batch / world`` pairs of every global batch, so the global batches are the same
as in a one-process run), PixelCenter centres over the global batch (``global_batch``), and
DistributedDataParallel wraps a module whose one forward runs the four draws. On CUDA,
BatchNorm becomes SyncBatchNorm; on CPU (gloo), where SyncBatchNorm is not supported,
batch norm uses per-rank statistics (and the saved running statistics are rank 0's).
Only rank 0 writes the run folder and shows progress; every rank reads
``checkpoints/state.pt`` on ``--resume``, so the run folder must be on a file system all
nodes share. torchrun forwards SIGTERM / SIGINT to the ranks, which finish the step and
save (torchrun itself then exits non-zero with its own message).

On a cluster, one torchrun per node with a rendezvous on the first node, e.g. 2 nodes
of 8 GPUs under SLURM (one task per node; ``--signal=TERM@120`` asks SLURM for a SIGTERM
two minutes before the time limit, enough to save)::

    srun --nodes=2 --ntasks-per-node=1 torchrun --nnodes=2 --nproc_per_node=8 \
        --rdzv-id=$SLURM_JOB_ID --rdzv-backend=c10d \
        --rdzv-endpoint=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1):29500 \
        -m fmapicon train --data /shared/videos --out /shared/runs/r1 --batch 64
"""

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
