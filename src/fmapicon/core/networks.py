"""The feature networks: the original's U-Net family, NormScale and PixelCenter.

A feature network maps images ``B x 3 x H x W`` (RGB in [0, 1]) to feature maps
``B x C x h x w``:

    FeatureNet = backbone -> PixelCenter (optional, attempt 2) -> NormScale

in the original's order (centre, then normalize). The backbone is a ``UNet`` from ``PRESETS`` (h x w = H x W, stride 1) or any
module mapping ``B x 3 x H x W`` to ``B x C x h x w``.

State-dict keys of a ``FeatureNet``: ``backbone.*``, ``pixel_center.running_mean``
(``1 x C x h x w``, present only with a centre) and ``norm_scale.scale`` (lambda, a
0-dim tensor).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fmapicon.errors import UserError

# preset -> (down channels, up channels) as in the original (models.py)
PRESETS = {
    "short": ([3, 64, 64, 128, 256], [64, 64, 128, 512]),
    "tall": ([3, 64, 64, 128, 256, 512], [64, 64, 128, 256, 256]),
    "taller": ([3, 64, 64, 128, 256, 512, 512, 512], [64, 64, 128, 256, 256, 512, 512]),
}
# strided backbones (fmapicon.core.resnet): name -> output stride
STRIDED = {"resnet-s4": 4, "resnet-s8": 8}
NETS = (*PRESETS, *STRIDED)


def net_stride(net: str) -> int:
    """Input pixels per feature pixel of the backbone called ``net`` (1 for the U-Nets)."""
    return STRIDED.get(net, 1)


def feature_size(size: int, net: str) -> int:
    """The feature-map side of a backbone ``net`` for an input side ``size``: ceil(size / stride)."""
    return -(-int(size) // net_stride(net))


# --------------------------------------------------------------------------- U-Net


def _fit_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Keep the first ``channels`` channels of ``x``, or prepend zero channels to reach
    ``channels`` (the original pads in front, so the pooled input sits in the last ones)."""
    missing = channels - x.shape[1]
    if missing <= 0:
        return x[:, :channels]
    return F.pad(x, (0, 0, 0, 0, missing, 0))


class ResidualBlock(nn.Module):
    """``x + conv(relu(bn(conv(relu(bn(x))))))`` with 3 x 3 convolutions, C -> C."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.norm2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x):
        y = self.conv1(F.relu(self.norm1(x)))
        y = self.conv2(F.relu(self.norm2(y)))
        return x + y


class UNet(nn.Module):
    """The original's U-Net (``UNet2``), for any H, W >= 1.

    Level k down (k = 0 .. L-1), from ``down[k]`` to ``down[k+1]`` channels, size
    n -> ceil(n / 2):
        x <- conv3x3_stride2(leaky_relu(x)) + pad_channels(avg_pool2x2_ceil(x))
    Level k up (k = L-1 .. 0), size m -> 2m then cropped to the skip's size n (2m >= n
    because m = ceil(n / 2), so odd sizes work):
        y <- bn(residual(convT4x4_stride2_pad1(leaky_relu(x))))[..., :n_h, :n_w]
        x <- concat(y, skip_k)            skip_0 is the input image
    Head: a 3 x 3 convolution from ``up[0] + down[0]`` to ``out_channels`` channels.

    Parameters
    ----------
    down_channels : L + 1 channel counts, ``down_channels[0]`` = 3 (RGB)
    up_channels : L channel counts of the up levels
    out_channels : C of the output feature map ``B x C x H x W``
    """

    stride = 1

    def __init__(self, down_channels, up_channels, out_channels: int = 64):
        super().__init__()
        down, up = list(down_channels), list(up_channels)
        if len(down) != len(up) + 1 or not up:
            raise ValueError(f"UNet needs L + 1 down and L up channel counts (L >= 1), got {down} and {up}")
        levels = len(up)
        # up level k sees the level below's output (none at the bottom) and skip k+1
        up_inputs = [down[k + 1] + (up[k + 1] if k + 1 < levels else 0) for k in range(levels)]
        self.down = nn.ModuleList(nn.Conv2d(down[k], down[k + 1], 3, stride=2, padding=1) for k in range(levels))
        self.up = nn.ModuleList(nn.ConvTranspose2d(up_inputs[k], up[k], 4, stride=2, padding=1) for k in range(levels))
        self.residual = nn.ModuleList(ResidualBlock(up[k]) for k in range(levels))
        self.up_norm = nn.ModuleList(nn.BatchNorm2d(up[k]) for k in range(levels))
        self.head = nn.Conv2d(up[0] + down[0], out_channels, 3, padding=1)
        self.channels = out_channels

    def forward(self, x):
        skips = []
        for conv in self.down:
            skips.append(x)
            y = conv(F.leaky_relu(x))
            x = y + _fit_channels(F.avg_pool2d(x, 2, ceil_mode=True), y.shape[1])
        for k in reversed(range(len(self.up))):
            y = self.up_norm[k](self.residual[k](self.up[k](F.leaky_relu(x))))
            skip = skips[k]
            x = torch.cat([y[:, :, : skip.shape[2], : skip.shape[3]], skip], dim=1)
        return self.head(x)


# --------------------------------------------------------------------------- NormScale


class NormScale(nn.Module):
    """``x / (|x| + 1e-6) * lambda`` per pixel, |x| the norm over channels; lambda is
    the trainable scalar ``scale`` (initial 12, as the writeup suggests)."""

    def __init__(self, lambda_init: float = 12.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(lambda_init)))

    @property
    def lambda_(self) -> float:
        return float(self.scale.detach())

    def forward(self, x):
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        return x / (norm + 1e-6) * self.scale

    def extra_repr(self):
        return f"lambda={self.lambda_:.4g}"


# --------------------------------------------------------------------------- PixelCenter


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; backward sums the incoming gradients over processes too.

    With ``s = sum_r x_r`` on every rank and rank r's loss L_r depending on its copy of s,
    dL/dx_r = sum_r' dL_r'/ds: exactly the all-reduced gradient. (Written here rather than
    torch.distributed.nn.functional.all_reduce, which is deprecated, with no public
    differentiable replacement.)
    """

    @staticmethod
    def forward(ctx, tensor):
        import torch.distributed as dist

        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad):
        return _AllReduceSum.apply(grad)


def _global_batch_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (``B x C x h x w``) over the batch of *all* processes: ``1 x C x h x w``.

    The per-rank sums are added by ``_AllReduceSum``, whose backward all-reduces (sums)
    the gradients: rank r's sum receives the gradient of every rank's loss, which DDP's
    gradient averaging turns into the gradient of the mean loss, exactly as one process
    holding the global batch would get. Ranks may hold different batch sizes (the sample
    counts are all-reduced too). Every rank must call it, in the same order.
    """
    import torch.distributed as dist

    total = _AllReduceSum.apply(x.sum(dim=0, keepdim=True))
    count = torch.tensor([float(x.shape[0])], device=x.device)
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return total / count.to(total.dtype)


def _resize(mean: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resampling (align_corners=False) of a ``1 x C x h x w`` mean to ``size``."""
    if tuple(mean.shape[-2:]) == tuple(size):
        return mean
    return F.interpolate(mean, size=tuple(size), mode="bilinear", align_corners=False)


class PixelCenter(nn.Module):
    """Subtract, at each pixel location, the mean feature vector over the batch.

    training
        ``out = x - m`` with ``m = mean_b x[b]`` (``1 x C x h x w``; the mean over the
        batch dimension only, with gradients through m; with ``global_batch`` the mean over
        the batch of all torch.distributed processes, see ``_global_batch_mean``). The buffer ``running_mean`` is updated
        without gradient: ``running = (1 - momentum) running + momentum m``. When x is not
        at the buffer's size, m is resampled bilinearly (align_corners=False) to the
        buffer's size for that update; the output always uses m at x's own size. A batch
        of one sample is centred to all zeros (as in the original).
    eval
        ``out = x - running_mean`` when x is at the buffer's h x w (the training size).
        At any other size, ``out = x - mean_{h,w} running_mean``: only the
        location-independent part of the mean is subtracted. Never raises for a size.

        Why not resample the map: its location-dependent part is large and comes from
        the frame's borders at the training size (zero padding within the receptive
        field); stretched bilinearly to another frame size it no longer matches where
        the borders are and writes a smooth positional code into every feature (the
        measurements: ``docs/experiments.md``).

    Parameters
    ----------
    channels : C
    size : (h, w) of the running mean, the training feature-map size (an int means square)
    momentum : weight of the new batch mean in the running mean (0.1 as the original)
    global_batch : in training, centre over the global batch of all processes (needs an
        initialized torch.distributed process group; every rank calls forward in step). Set
        by the trainer for data-parallel runs; not saved with the weights.
    """

    def __init__(self, channels: int, size=(120, 120), momentum: float = 0.1, global_batch: bool = False):
        super().__init__()
        size = (size, size) if isinstance(size, int) else tuple(size)
        self.momentum = float(momentum)
        self.global_batch = bool(global_batch)
        self.register_buffer("running_mean", torch.zeros(1, channels, *size))

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.running_mean.shape[1]:
            raise ValueError(
                f"PixelCenter expected B x {self.running_mean.shape[1]} x h x w features, "
                f"got shape {tuple(x.shape)}"
            )
        if not self.training:
            mean = self.running_mean
            if tuple(x.shape[-2:]) != tuple(mean.shape[-2:]):
                mean = mean.mean(dim=(2, 3), keepdim=True)
            return x - mean.to(x.dtype)
        mean = _global_batch_mean(x) if self.global_batch else x.mean(dim=0, keepdim=True)
        self._update(mean.detach())
        return x - mean

    @torch.no_grad()
    def _update(self, mean: torch.Tensor) -> None:
        mean = _resize(mean.to(self.running_mean.dtype), self.running_mean.shape[-2:])
        self.running_mean.lerp_(mean, self.momentum)

    def extra_repr(self):
        channels, h, w = self.running_mean.shape[1:]
        return f"channels={channels}, size=({h}, {w}), momentum={self.momentum}, global_batch={self.global_batch}"


# --------------------------------------------------------------------------- FeatureNet


def _probe(backbone: nn.Module):
    """(stride, channels) of a backbone from one 64 x 64 forward pass in eval mode."""
    parameter = next(backbone.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(1, 3, 64, 64, device=device))
    finally:
        backbone.train(was_training)
    return max(1, round(64 / out.shape[-1])), out.shape[1]


class FeatureNet(nn.Module):
    """``norm_scale(pixel_center(backbone(images)))``: ``B x 3 x H x W`` -> ``B x C x h x w``.

    Attributes
    ----------
    stride : input pixels per feature pixel (1 for the U-Net); the argument, else the
        backbone's ``stride`` attribute, else measured once with a 64 x 64 probe
    channels : C; the argument, else the backbone's ``channels``, else probed
    lambda_ : NormScale's current lambda, a float
    """

    def __init__(self, backbone: nn.Module, center: PixelCenter | None, norm_scale: NormScale,
                 *, stride: int | None = None, channels: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.pixel_center = center
        self.norm_scale = norm_scale
        stride = stride if stride is not None else getattr(backbone, "stride", None)
        channels = channels if channels is not None else getattr(backbone, "channels", None)
        if stride is None or channels is None:
            probed_stride, probed_channels = _probe(backbone)
            stride = probed_stride if stride is None else stride
            channels = probed_channels if channels is None else channels
        self.stride, self.channels = int(stride), int(channels)
        if center is not None and center.running_mean.shape[1] != self.channels:
            raise ValueError(
                f"PixelCenter has {center.running_mean.shape[1]} channels but the backbone "
                f"gives {self.channels}; build it with PixelCenter({self.channels}, size)"
            )

    @property
    def lambda_(self) -> float:
        return self.norm_scale.lambda_

    def forward(self, images):
        features = self.backbone(images)
        if self.pixel_center is not None:
            features = self.pixel_center(features)
        return self.norm_scale(features)


class UnitFeatures(nn.Module):
    """Unit-norm features for evaluation: ``F.normalize(net(images), dim=1)``.

    Passes ``stride``, ``channels`` and ``lambda_`` through; its state-dict keys are the
    wrapped net's under ``net.``.
    """

    def __init__(self, net: FeatureNet):
        super().__init__()
        self.net = net
        self.stride, self.channels = net.stride, net.channels

    @property
    def lambda_(self) -> float:
        return self.net.lambda_

    def forward(self, images):
        return F.normalize(self.net(images), dim=1)


# --------------------------------------------------------------------------- building


def calibrate_pixel_center(net, frames: torch.Tensor, batch: int = 16) -> bool:
    """Set PixelCenter's running mean to the mean backbone output over ``frames`` at the
    current weights (BatchNorm in eval mode, as at evaluation; the net's mode is restored).

    Parameters
    ----------
    net : a ``FeatureNet``; nothing happens (False) without a PixelCenter
    frames : ``M x 3 x S x S`` frames in [0, 1] at the training size, as evaluation sees them
        (not augmented: the mean is the positional component of the backbone at eval, plus the
        content mean, spread about evenly over the locations by the variety of scenes)

    Why: in training PixelCenter subtracts each batch's own mean, and its running mean
    (momentum 0.1) trails the weights by about ten steps. The component it removes is large
    against the image-dependent part, so that small lag leaves a positional residual that
    dominates the eval-mode features (measured: ``docs/experiments.md``). Training therefore
    writes every weights file with a calibrated mean (``fmapicon.train``).
    """
    if net.pixel_center is None:
        return False
    was_training = net.training
    net.eval()
    running = net.pixel_center.running_mean
    with torch.no_grad():
        total = sum(net.backbone(chunk.to(running.device)).float().sum(0, keepdim=True) for chunk in frames.split(batch))
        mean = total / len(frames)
    net.train(was_training)
    if mean.shape != running.shape:
        raise ValueError(f"calibration frames give a {tuple(mean.shape[-2:])} feature map but PixelCenter was "
                        f"trained at {tuple(running.shape[-2:])}: calibrate with frames of the training size")
    running.copy_(mean.to(running.dtype))
    return True


@dataclass
class NetworkConfig:
    """What ``build_network`` builds.

    net : a U-Net preset in ``PRESETS`` (short, tall, taller) or a strided backbone in
        ``STRIDED`` (resnet-s4, resnet-s8: ``fmapicon.core.resnet.StridedResNet``)
    channels : C, feature channels of the output
    lambda_init : NormScale's initial lambda
    center : whether to apply PixelCenter (attempt 2)
    size : (h, w) of PixelCenter's running mean: the training *feature-map* size
        (``feature_size(S, net)`` for S x S training frames; ``network_config`` derives it
        from a run config)
    """

    net: str = "short"
    channels: int = 64
    lambda_init: float = 12.0
    center: bool = True
    size: tuple = (120, 120)


def _checked(config: NetworkConfig) -> NetworkConfig:
    if config.net not in NETS:
        raise ValueError(f"unknown network preset {config.net!r}: expected one of {', '.join(NETS)}")
    size = (config.size, config.size) if isinstance(config.size, int) else tuple(config.size)
    if len(size) != 2 or min(size) < 1 or int(config.channels) < 1:
        raise ValueError(f"network channels must be >= 1 and size (h, w) positive, got "
                        f"channels={config.channels!r}, size={config.size!r}")
    if not math.isfinite(float(config.lambda_init)):
        raise ValueError(f"lambda_init must be a finite number, got {config.lambda_init!r}")
    return dataclasses.replace(config, size=size, channels=int(config.channels))


def build_network(config: NetworkConfig | None = None, **overrides) -> FeatureNet:
    """The ``FeatureNet`` described by ``config`` (default ``NetworkConfig()``) with
    ``overrides`` (field names of NetworkConfig) applied."""
    config = config if config is not None else NetworkConfig()
    fields = {field.name for field in dataclasses.fields(NetworkConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown network option(s) {unknown}: expected some of {sorted(fields)}")
    config = _checked(dataclasses.replace(config, **overrides))
    backbone = _backbone(config.net, config.channels)
    center = PixelCenter(config.channels, config.size) if config.center else None
    return FeatureNet(backbone, center, NormScale(config.lambda_init), stride=backbone.stride,
                      channels=config.channels)


# keys of a run config that a network no longer accepts: their value when they were off
_REMOVED_NETWORK_KEYS = {"pixels_weight": 0.0}


def network_config(run_config: dict, source: str = "this run config") -> NetworkConfig:
    """The ``NetworkConfig`` of a run config: the one rule, for training and for loading.

    ``run_config`` is a ``TrainConfig`` as a dict (the keys net, channels, lambda_init,
    center and size; an integer size S is the training side in pixels, and PixelCenter's
    size is the feature map's, ``feature_size(S, net)`` squared; an (h, w) pair is that
    feature-map size already) or a saved config whose ``network`` entry is a
    ``NetworkConfig`` as a dict. ``UserError`` naming
    ``source`` (a file) when the config does not describe a network this version builds.
    """
    names = [f.name for f in dataclasses.fields(NetworkConfig)]
    if run_config.get("network"):
        values = dict(run_config["network"])
    else:
        values = {key: run_config[key] for key in names if key in run_config}
        if isinstance(values.get("size"), int) and values.get("net") in NETS:  # a training side S
            side = feature_size(values["size"], values["net"])
            values["size"] = (side, side)
    if "net" not in values:
        raise UserError(f"{source} does not say which network it holds (expected a 'network' entry or the keys "
                        f"{', '.join(names)})")
    for key, off in _REMOVED_NETWORK_KEYS.items():
        value = values.pop(key, run_config.get(key, off))
        if value != off:
            raise UserError(f"{source} describes a network with {key}={value!r}, an option this version no longer "
                            "has (docs/experiments.md names the commit where it can be run)")
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UserError(f"{source} describes a network with unknown key(s) {', '.join(unknown)}; expected "
                        f"{', '.join(names)}")
    if isinstance(values.get("size"), (list, tuple)):
        values["size"] = tuple(values["size"])
    try:
        return _checked(NetworkConfig(**values))
    except (TypeError, ValueError) as error:
        raise UserError(f"{source}: {error}") from error


def _backbone(net: str, channels: int) -> nn.Module:
    if net in STRIDED:
        from fmapicon.core.resnet import StridedResNet

        return StridedResNet(STRIDED[net], out_channels=channels)
    down, up = PRESETS[net]
    return UNet(down, up, out_channels=channels)
