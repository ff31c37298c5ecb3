"""The network, its data-parallel wrapper, the optimizer and the mixed-precision dtype of a run."""

from __future__ import annotations

from fmapicon.errors import UserError
from fmapicon.train.config import TrainConfig
from fmapicon.train.distributed import Processes


def init_network(config: TrainConfig, given=None):
    """``config`` with the network preset and channels of its ``init`` weights (unchanged
    without ``init``), and the loaded ``UnitFeatures`` model (or None).

    ``given``: the option names the user set (flags, config file); one of ``net`` or
    ``channels`` that is given, or (``given=None``: a ``TrainConfig`` from Python) any that
    differs from the weights', is a ``UserError``: fine-tuning keeps the network it starts from.
    """
    import dataclasses

    if not config.init:
        return config, None
    from fmapicon.core.checkpoint import load
    from fmapicon.core.networks import network_config

    model = load(config.init, "cpu")
    net, channels = network_config(model.config, source=f"--init {config.init}").net, model.channels
    clash = [f"--{key} {getattr(config, key)} (the weights: {value})" for key, value in (("net", net), ("channels", channels))
             if getattr(config, key) != value and (given is None or key in given)]
    if clash:
        raise UserError(f"--init {config.init} holds a {net} network with {channels} channels, but the options ask "
                        f"for {', '.join(clash)}: drop them (fine-tuning keeps the network it starts from) or start "
                        "from random weights without --init")
    return dataclasses.replace(config, net=net, channels=channels), model


def init_weights(net, model) -> list[str]:
    """Copy ``model``'s weights (a loaded ``init``) into the fresh ``net``; returns the names
    not copied: PixelCenter's running mean when the training size differs (training
    centres on each batch's own mean, and every save recalibrates it)."""
    from fmapicon.core.checkpoint import feature_net

    state = feature_net(model).state_dict()
    own = net.state_dict()
    skipped = [name for name, tensor in state.items() if name in own and own[name].shape != tensor.shape
               and name.startswith("pixel_center.")]
    net.load_state_dict({name: t for name, t in state.items() if name not in skipped}, strict=not skipped)
    return skipped


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
