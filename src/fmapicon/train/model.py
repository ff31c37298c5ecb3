"""The network, its data-parallel wrapper, the optimizer and the mixed-precision dtype of a run."""

from __future__ import annotations

from fmapicon.errors import UserError
from fmapicon.train.config import TrainConfig
from fmapicon.train.distributed import Processes


def four_draw_module(net, augmentation):
    """A module whose one forward runs the four augmented draws, so that DDP sees one
    forward per backward (defined here to keep this module's import free of torch). It
    returns ``(a1, b2, a3, b4)`` (``four_draws``)."""
    import torch

    from fmapicon.core.augment import four_draws

    class FourDraws(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, a, b, generator):
            return four_draws(self.net, a, b, augmentation, generator=generator)

    return FourDraws()


def distributed_model(module, processes: Processes, device):
    import torch
    from torch.nn.parallel import DistributedDataParallel

    if not processes.distributed:
        return module
    if device.type == "cuda":
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return DistributedDataParallel(module, device_ids=[device.index])
    return DistributedDataParallel(module)  # gloo: BatchNorm keeps per-rank statistics


def make_optimizer(config: TrainConfig, parameters):
    import torch

    if config.optim == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=config.lr, alpha=0.99, eps=1e-8)
    if config.optim == "adam":
        return torch.optim.Adam(parameters, lr=config.lr)
    return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.01)


def amp_dtype(config: TrainConfig, device):
    import torch

    if config.amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device (it relies on a gradient scaler); use --amp bf16 on CPU")
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.amp]
