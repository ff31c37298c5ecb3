"""Training throughput: pairs per second of a training step for each U-Net preset and
frame size, and where the time goes.

A step is timed whole (``step_s``: the four augmented forward passes, the loss, the
backward pass and the optimizer update, as ``fmapicon.train`` runs it) and in parts:

data
    making one batch of pairs with ``FramePairs`` in this process (``--data``, default
    synthetic scenes); with DataLoader workers this overlaps the step in training
network
    the four augmented forward passes and the backward pass through the network (fed a
    fixed gradient in place of the loss's)
loss
    ``log_p`` forward and backward on the four feature maps

``pairs_per_s`` = batch / (data_s + step_s), the rate of a training run without
workers; the shares are of data_s + network_s + loss_s. Each figure is the best of
``--repeat`` runs after one warm-up step. On a shared CPU the numbers are noisy: compare
rows of one run.
"""

from __future__ import annotations

import argparse
import time

from fmapicon.cli._types import int_list, positive_int
from fmapicon.train.config import AUGMENTATIONS

HELP = "training throughput (pairs/s) per preset and size, with the time split into data, network and loss"


def _presets(text: str) -> list[str]:
    from fmapicon.train.config import NETS

    names = [part for part in text.split(",") if part]
    bad = [name for name in names if name not in NETS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected presets from {', '.join(NETS)}, got {text!r}")
    return names


def add_arguments(parser) -> None:
    parser.add_argument("--presets", type=_presets, default=["short", "tall", "taller"],
                        help="comma-separated U-Net presets (default: short,tall,taller)")
    parser.add_argument("--sizes", type=int_list(8), default=[64, 120],
                        help="comma-separated frame sizes S (default: 64,120; the loss costs O(S^4) per pair)")
    parser.add_argument("--batch", type=positive_int, default=2,
                        help="pairs per step (default: 2, small so a CPU finishes; training uses 64)")
    parser.add_argument("--channels", type=positive_int, default=64, help="feature channels C (default: 64)")
    parser.add_argument("--repeat", type=positive_int, default=1,
                        help="timed runs per figure, the best kept, after one warm-up step (default: 1)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice; on a CPU shared with other jobs, 1 "
                        "avoids OpenMP threads waiting on each other)")
    parser.add_argument("--devices", default="auto", choices=["auto", "cpu", "cuda", "all"],
                        help="auto: CUDA when available, else CPU; all: CPU and CUDA (when available) "
                        "(default: auto)")
    parser.add_argument("--data", nargs="+", default=["synth"], metavar="SRC",
                        help="training sources as for `fmapicon train --data` (default: synth)")
    parser.add_argument("--aug", default="roll+affine", choices=AUGMENTATIONS,
                        help="augmentation of the four draws (default: roll+affine)")


def _devices(choice: str) -> list:
    import torch

    cuda = torch.cuda.is_available()
    if choice == "all":
        return ["cpu", "cuda"] if cuda else ["cpu"]
    if choice == "auto":
        return ["cuda" if cuda else "cpu"]
    if choice == "cuda" and not cuda:
        from fmapicon.errors import UserError

        raise UserError("--devices cuda was asked for but torch sees no CUDA device; use --devices cpu")
    return [choice]


def _best(fn, repeat: int) -> float:
    """Best wall time of ``fn()`` over ``repeat`` runs (CUDA synchronized); the case ran a
    whole warm-up step before."""
    from fmapicon.bench import timed

    return timed(fn, repeat=repeat, warmup=0)


class _Case:
    """One preset at one size on one device: a net, an optimizer, a batch."""

    def __init__(self, args, preset: str, size: int, device: str):
        import torch

        from fmapicon.core.augment import make_augmentation
        from fmapicon.data.pairs import FramePairs
        from fmapicon.core.networks import NetworkConfig, build_network, feature_size
        from fmapicon.train import TrainConfig
        from fmapicon.train.model import make_optimizer

        torch.manual_seed(0)
        self.device = torch.device(device)
        self.dataset = FramePairs(args.data, size=size, seed=0)
        self.batch = args.batch
        self.net = build_network(NetworkConfig(net=preset, channels=args.channels,
                                                   size=(feature_size(size, preset),) * 2))
        self.net.to(self.device).train()
        self.augmentation = make_augmentation(args.aug, stride=self.net.stride)
        self.optimizer = make_optimizer(TrainConfig.for_recipe("original"), self.net.parameters())
        self.generator = torch.Generator().manual_seed(0)
        self.next_index = 0
        self.a, self.b = (t.to(self.device) for t in self.load())
        with torch.no_grad():  # the loss alone is timed on fixed feature maps
            maps = self.features()
            self.fixed_features = tuple(f.detach() for f in maps)
        self.step()  # warm-up: first-call allocations and kernel selection

    def load(self):
        from torch.utils.data import default_collate

        items = [self.dataset[(self.next_index + i) % len(self.dataset)] for i in range(self.batch)]
        self.next_index += self.batch
        return default_collate(items)

    def features(self):
        from fmapicon.core.augment import four_draws

        return four_draws(self.net, self.a, self.b, self.augmentation, generator=self.generator)

    def step(self) -> None:
        import torch

        from fmapicon.core.objective import log_p

        self.optimizer.zero_grad(set_to_none=True)
        loss = -log_p(*self.features(), eps=1e-4).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 20.0)
        self.optimizer.step()

    def network(self) -> None:
        import torch

        features = self.features()
        torch.autograd.backward(features, [torch.ones_like(f) / f.numel() for f in features])

    def loss(self) -> None:
        from fmapicon.core.objective import log_p

        leaves = [f.clone().requires_grad_() for f in self.fixed_features]
        (-log_p(*leaves, eps=1e-4).mean()).backward()


def measure(args, preset: str, size: int, device: str) -> dict:
    """One row: the timings of one preset at one size on one device."""
    case = _Case(args, preset, size, device)
    times = {"data_s": _best(case.load, args.repeat), "network_s": _best(case.network, args.repeat),
             "loss_s": _best(case.loss, args.repeat), "step_s": _best(case.step, args.repeat)}
    parts = times["data_s"] + times["network_s"] + times["loss_s"]
    return {"device": device, "preset": preset, "size": size, "batch": args.batch,
            "pairs_per_s": args.batch / (times["data_s"] + times["step_s"]), **times,
            "data_share": times["data_s"] / parts, "network_share": times["network_s"] / parts,
            "loss_share": times["loss_s"] / parts}


def main(args) -> int:
    from fmapicon.bench import report

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    rows = [measure(args, preset, size, device) for device in _devices(args.devices)
            for size in args.sizes for preset in args.presets]
    notes = [f"batch {args.batch}, C = {args.channels}, aug {args.aug}, data {' '.join(args.data)}; "
             f"best of {args.repeat} after a warm-up step; {torch.get_num_threads()} torch threads; "
             f"{time.perf_counter() - started:.0f} s in all",
             "pairs_per_s = batch / (data_s + step_s): one process, no DataLoader workers",
             "shares are of data_s + network_s + loss_s; shared machines are noisy, compare rows of one run"]
    report("train", rows, args.json, notes=notes)
    return 0
