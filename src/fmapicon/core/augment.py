"""Equivariant augmentation: warp the input, run the network, un-warp the feature map.

One *draw* samples parameters for every sample of a batch, warps the images
(``B x 3 x H x W``) and afterwards un-warps the network's feature map (``B x C x h x w``).
If the network were equivariant to the warp, a draw would change nothing; where it is
not, the FeatureMapICON objective punishes it. Four independent draws give the four
feature maps of the objective (``four_draws``).

Conventions (as the original code, and tested in tests/core/test_augment.py)
-------------------------------------------------------------------------
affine
    ``T = I + scale * N(0, 1)`` on the top two rows of a 3 x 3 matrix (per sample;
    ``scale`` = 0.05). ``T`` acts on *normalized* coordinates p in [-1, 1]^2 (x first,
    then y) through ``F.affine_grid`` / ``F.grid_sample`` with ``align_corners=False``,
    bilinear interpolation and zero padding: ``warped(p) = image(T p)`` and
    ``unwarped(p) = features(T^-1 p)``, with ``T^-1`` the exact matrix inverse. Because
    the normalized width is 2, the translation's standard deviation is 0.05 / 2 = 0.025
    of the image width (and height). Being in normalized coordinates, the same draw
    un-warps a feature map of any resolution (a strided backbone). With probability 1/2
    ``T`` and ``T^-1`` swap roles; the original swaps for the whole batch at once, here
    each sample swaps independently (same distribution per sample, less correlated
    batches).
roll
    Per sample, integer shifts (dy, dx) uniform on [0, H) x [0, W), applied with
    wrap-around exactly as ``np.roll(image, (dy, dx), axis=(-2, -1))``, i.e.
    ``rolled[y, x] = image[(y - dy) mod H, (x - dx) mod W]``; the un-roll is exact. With a
    backbone of stride s the shifts are multiples of s (``dy = s * ky``, ky uniform on
    [0, ceil(H / s))) and a feature map at the reduced resolution is un-rolled by
    (-ky, -kx) modulo its own size; this is an exact inverse of the network's shift when
    H and W are multiples of s.
order
    ``roll -> T -> network -> T^-1 -> un-roll`` for ``roll+affine`` (the original's final
    version): ``Compose(Roll(), Affine())`` (the first part is the outermost).
borders
    Zero padding brings zeros in at the borders of the warped image and of the un-warped
    feature map. They are *not* renormalized and stay in the loss: the original notes that
    training fails without them.

Randomness: ``sample(..., generator=g)`` draws on ``g``'s device (a CPU generator is
fine for a CUDA batch) and moves the parameters to ``device``, so a seeded generator
gives the same draws on every device. Without a generator the global RNG of ``device``
is used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


AUGMENTATIONS = ("none", "affine", "roll", "roll+affine")


def random_source(device, generator):
    """Where to draw: the generator's own device when one is given, else ``device``."""
    if generator is None:
        return {"device": torch.device(device)}
    return {"device": generator.device, "generator": generator}


def _check_batch(tensor: torch.Tensor, batch: int, what: str) -> None:
    if tensor.dim() != 4 or tensor.shape[0] != batch:
        raise ValueError(
            f"{what}: expected a B x C x H x W tensor with B = {batch} (the batch the draw "
            f"was sampled for), got shape {tuple(tensor.shape)}"
        )


# --------------------------------------------------------------------------- draws


def _check_size(images: torch.Tensor, height: int, width: int, what: str) -> None:
    if tuple(images.shape[-2:]) != (height, width):
        raise ValueError(
            f"{what} warp: the draw was sampled for {height} x {width} images, "
            f"got {tuple(images.shape[-2:])}; sample a new draw for this size"
        )


def _positive_stride(stride, what: str) -> int:
    if int(stride) < 1:
        raise ValueError(f"{what} stride must be a positive integer, got {stride!r}")
    return int(stride)


def _feature_units(size: int, full: int, stride: int, what: str) -> int:
    """How many input pixels one feature pixel spans along a feature side of ``size`` when
    the network's input side was ``full``: 1 (full resolution) or the stride."""
    if size == full:
        return 1
    if stride > 1 and size in (full // stride, -(-full // stride)):
        return stride
    raise ValueError(
        f"{what} unwarp: a feature side of {size} fits neither the input side {full} nor "
        f"the input side divided by the stride {stride}; build the augmentation "
        f"with the backbone's stride (make_augmentation(name, stride=net.stride))"
    )


class Draw:
    """One draw's per-sample parameters for a batch; this base class is the identity.

    ``warp(images: B x 3 x H x W) -> B x 3 x H x W`` is applied before the network,
    ``unwarp(features: B x C x h x w) -> B x C x h x w`` after it; h x w may differ from
    H x W (a strided backbone).
    """

    def __init__(self, batch: int):
        self.batch = batch

    def warp(self, images: torch.Tensor) -> torch.Tensor:
        _check_batch(images, self.batch, "warp")
        return images

    def unwarp(self, features: torch.Tensor) -> torch.Tensor:
        _check_batch(features, self.batch, "unwarp")
        return features


class AffineDraw(Draw):
    """Resample by ``forward`` (``B x 2 x 3``) before the network and by ``backward``
    (its exact inverse) after it, in normalized [-1, 1] coordinates (see the module
    docstring for the conventions)."""

    def __init__(self, forward: torch.Tensor, backward: torch.Tensor):
        super().__init__(forward.shape[0])
        self.forward = forward
        self.backward = backward

    @staticmethod
    def _resample(tensor: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        # grid_sample needs the grid in the tensor's dtype (float16/bfloat16 under autocast)
        theta = theta.to(device=tensor.device, dtype=tensor.dtype)
        grid = F.affine_grid(theta, list(tensor.shape), align_corners=False)
        return F.grid_sample(tensor, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def warp(self, images):
        _check_batch(images, self.batch, "warp")
        return self._resample(images, self.forward)

    def unwarp(self, features):
        _check_batch(features, self.batch, "unwarp")
        return self._resample(features, self.backward)

def roll(tensor: torch.Tensor, shift_y: torch.Tensor, shift_x: torch.Tensor) -> torch.Tensor:
    """Per-sample ``np.roll`` with wrap-around, as one gather (no loop over the batch).

    ``out[b, :, y, x] = tensor[b, :, (y - shift_y[b]) mod H, (x - shift_x[b]) mod W]``.

    Parameters
    ----------
    tensor : B x C x H x W
    shift_y, shift_x : (B,) integer shifts (any sign; taken modulo H and W)
    """
    batch, channels, height, width = tensor.shape
    device = tensor.device
    rows = (torch.arange(height, device=device)[None, :] - shift_y.to(device)[:, None]) % height
    cols = (torch.arange(width, device=device)[None, :] - shift_x.to(device)[:, None]) % width
    source = (rows[:, :, None] * width + cols[:, None, :]).reshape(batch, 1, height * width)
    flat = tensor.reshape(batch, channels, height * width)
    gathered = torch.gather(flat, 2, source.expand(batch, channels, height * width))
    return gathered.reshape(batch, channels, height, width)


class RollDraw(Draw):
    """Roll the images by ``stride * (ky, kx)`` pixels and the feature map back.

    Parameters
    ----------
    steps_y, steps_x : (B,) integer shifts in units of ``stride`` pixels
    stride : input pixels per feature pixel of the backbone
    height, width : the input size the draw was sampled for
    """

    def __init__(self, steps_y, steps_x, stride: int, height: int, width: int):
        super().__init__(steps_y.shape[0])
        self.steps_y, self.steps_x = steps_y, steps_x
        self.stride, self.height, self.width = stride, height, width

    def warp(self, images):
        _check_batch(images, self.batch, "warp")
        _check_size(images, self.height, self.width, "roll")
        return roll(images, self.steps_y * self.stride, self.steps_x * self.stride)

    def unwarp(self, features):
        _check_batch(features, self.batch, "unwarp")
        h, w = features.shape[-2:]
        per_y = _feature_units(h, self.height, self.stride, "roll")
        per_x = _feature_units(w, self.width, self.stride, "roll")
        # a full-resolution map un-rolls by the pixel shift, a strided one by the step count
        shift_y = self.steps_y * (self.stride // per_y)
        shift_x = self.steps_x * (self.stride // per_x)
        return roll(features, -shift_y, -shift_x)


class ComposedDraw(Draw):
    """``parts[0]`` outermost: warps apply first to last, un-warps last to first."""

    def __init__(self, parts):
        super().__init__(parts[0].batch)
        self.parts = list(parts)

    def warp(self, images):
        for part in self.parts:
            images = part.warp(images)
        return images

    def unwarp(self, features):
        for part in reversed(self.parts):
            features = part.unwarp(features)
        return features


# --------------------------------------------------------------------------- augmentations


class Augmentation:
    """A distribution of draws. ``sample(batch, height, width, *, device, generator=None)``
    returns a ``Draw`` with independent parameters for each of the ``batch`` samples."""

    def sample(self, batch: int, height: int, width: int, *, device, generator=None) -> Draw:
        raise NotImplementedError


class NoAugmentation(Augmentation):
    """Attempt 0 of the writeup: no augmentation (the network collapses to a positional code)."""

    def sample(self, batch, height, width, *, device, generator=None):
        return Draw(batch)

    def __repr__(self):
        return "NoAugmentation()"


class Affine(Augmentation):
    """Small random affine warps: ``T = I + scale * N(0, 1)`` on the top two rows.

    The feature map is resampled with the exact inverse ``T^-1`` (computed in float64).
    With probability 1/2 per sample (``swap=True``) the roles of ``T`` and ``T^-1`` swap,
    as in the original (which swaps for the whole batch).
    """

    def __init__(self, scale: float = 0.05, swap: bool = True):
        self.scale, self.swap = float(scale), bool(swap)

    def sample(self, batch, height, width, *, device, generator=None):
        source = random_source(device, generator)
        noise = torch.randn(batch, 2, 3, dtype=torch.float64, **source)
        flip = torch.rand(batch, **source) < 0.5
        matrix = torch.eye(3, dtype=torch.float64, device=noise.device).repeat(batch, 1, 1)
        matrix[:, :2] += self.scale * noise
        inverse = torch.linalg.inv(matrix)
        if self.swap:
            flip = flip[:, None, None]
            matrix, inverse = torch.where(flip, inverse, matrix), torch.where(flip, matrix, inverse)
        forward = matrix[:, :2].to(device=device, dtype=torch.float32)
        backward = inverse[:, :2].to(device=device, dtype=torch.float32)
        return AffineDraw(forward, backward)

    def __repr__(self):
        return f"Affine(scale={self.scale}, swap={self.swap})"


class Roll(Augmentation):
    """Random rolls with wrap-around, shifts uniform on the multiples of ``stride`` in
    [0, H) x [0, W), independent per sample."""

    def __init__(self, stride: int = 1):
        self.stride = _positive_stride(stride, "roll")

    def sample(self, batch, height, width, *, device, generator=None):
        source = random_source(device, generator)
        steps_y = torch.randint(0, math.ceil(height / self.stride), (batch,), **source)
        steps_x = torch.randint(0, math.ceil(width / self.stride), (batch,), **source)
        return RollDraw(steps_y.to(device), steps_x.to(device), self.stride, height, width)

    def __repr__(self):
        return f"Roll(stride={self.stride})"


class Compose(Augmentation):
    """Compose augmentations; the first is the outermost (warped first, un-warped last).

    ``Compose(Roll(), Affine())`` is the original's roll -> T -> network -> T^-1 -> un-roll.
    Each part draws its own independent parameters.
    """

    def __init__(self, *parts: Augmentation):
        if not parts:
            raise ValueError("Compose needs at least one augmentation")
        self.parts = list(parts)

    def sample(self, batch, height, width, *, device, generator=None):
        draws = [part.sample(batch, height, width, device=device, generator=generator) for part in self.parts]
        return ComposedDraw(draws)

    def __repr__(self):
        return f"Compose({', '.join(map(repr, self.parts))})"


def make_augmentation(name: str, stride: int = 1) -> Augmentation:
    """The augmentation called ``name`` (one of ``AUGMENTATIONS``) for a backbone whose
    feature map has one pixel per ``stride`` input pixels."""
    if name == "none":
        return NoAugmentation()
    if name == "affine":
        return Affine()
    if name == "roll":
        return Roll(stride)
    if name == "roll+affine":
        return Compose(Roll(stride), Affine())
    raise ValueError(f"unknown augmentation {name!r}: expected one of {', '.join(AUGMENTATIONS)}")


# --------------------------------------------------------------------------- using draws


def augmented_features(network, images: torch.Tensor, augmentation: Augmentation, generator=None):
    """One draw: sample, warp ``images`` (B x 3 x H x W), run ``network``, un-warp.

    Returns the un-warped feature map ``B x C x h x w``.
    """
    batch, _, height, width = images.shape
    draw = augmentation.sample(batch, height, width, device=images.device, generator=generator)
    return draw.unwarp(network(draw.warp(images)))


def four_draws(network, a: torch.Tensor, b: torch.Tensor, augmentation: Augmentation, generator=None):
    """The four independently augmented feature maps of the objective, ``(a1, b2, a3, b4)``
    for ``log_p(a1, b2, a3, b4)``.

    Four separate network calls in the order A, B, A, B (each with its own draw), so
    that batch statistics (BatchNorm, PixelCenter) see each draw alone, as in the
    original. ``a`` and ``b`` are ``B x 3 x H x W`` pair batches (their H x W may differ).
    """
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"four_draws: frames A and B need the same batch size, got {a.shape[0]} and {b.shape[0]}")
    return tuple(augmented_features(network, frames, augmentation, generator) for frames in (a, b, a, b))
