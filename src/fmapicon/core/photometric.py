"""Photometric augmentation: colour jitter drawn independently for each of the four draws.

The equivariant augmentation (``fmapicon.core.augment``) moves pixels and moves the
features back; this one changes colours and moves nothing, so the objective asks the
features to be *invariant* to it: a pixel of A must still find itself in B when the two
draws saw different brightness, contrast, saturation and hue. Without it, the cheapest
way to match two frames a few frames apart is their exact colour, which is also what
changes over the longer gaps of label propagation.

The distortion is SimCLR's colour distortion of strength ``s`` (Chen et al. 2020, "A
Simple Framework for Contrastive Learning of Visual Representations", appendix A):
with probability 0.8 a jitter of brightness, contrast and saturation by factors uniform
on [max(0, 1 - 0.8 s), 1 + 0.8 s] and of hue by a turn uniform on [-0.2 s, 0.2 s], then
with probability 0.2 conversion to grey. Each operation is torchvision's
``ColorJitter`` operation written for a batch of per-sample factors (grey = ITU-R BT.601
luma, 0.299 R + 0.587 G + 0.114 B; contrast blends with the image's mean grey; values
clamped to [0, 1] after each operation), in a fixed order (brightness, contrast,
saturation, hue) where torchvision permutes it, and with the hue turned as a rotation
of the chroma plane of YIQ instead of a shift of HSV's hue: a linear map that keeps each
pixel's luma and chroma magnitude (where HSV's shift keeps value and saturation) and, like
it, leaves greys alone.
"""

from __future__ import annotations

import math

import torch

from fmapicon.core.augment import random_source
from fmapicon.errors import UserError

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as torchvision's rgb_to_grayscale

# RGB -> YIQ (NTSC 1953); its rows are the luma and the two chroma axes
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def grey(images: torch.Tensor) -> torch.Tensor:
    """``B x 1 x H x W`` luma of ``B x 3 x H x W`` RGB images in [0, 1]."""
    weights = images.new_tensor(LUMA).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``other + factor * (images - other)`` per sample, clamped to [0, 1] (torchvision's _blend)."""
    return (other + factor.view(-1, 1, 1, 1) * (images - other)).clamp(0.0, 1.0)


def turn_hue(images: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate each sample's chroma (I, Q of YIQ) by ``turns`` (``B``, in full turns) and keep
    its luma; clamped to [0, 1]."""
    yiq = images.new_tensor(_YIQ)
    back = torch.linalg.inv(yiq)
    angle = 2 * math.pi * turns.to(images)
    cos, sin = angle.cos(), angle.sin()
    rotation = torch.zeros(images.shape[0], 3, 3, dtype=images.dtype, device=images.device)
    rotation[:, 0, 0] = 1.0
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    matrix = back @ rotation @ yiq  # B x 3 x 3, acting on RGB
    return torch.einsum("bij,bjhw->bihw", matrix, images).clamp(0.0, 1.0)


class ColorJitter:
    """SimCLR's colour distortion of strength ``strength`` (see the module docstring).

    ``jitter(images, generator)`` takes ``B x 3 x H x W`` RGB in [0, 1] and returns a new
    tensor of that shape, each sample distorted with its own draw. Draws are made on the
    generator's device (or on ``images``' device without one), so a seeded CPU generator
    gives the same distortion on every device. ``strength`` 0 returns the images
    unchanged. Raises UserError for a negative strength or a probability outside [0, 1].
    """

    def __init__(self, strength: float, p_jitter: float = 0.8, p_grey: float = 0.2):
        if not strength >= 0:
            raise UserError(f"colour jitter strength must be >= 0 (0: off), got {strength!r}")
        for name, p in (("p_jitter", p_jitter), ("p_grey", p_grey)):
            if not 0.0 <= p <= 1.0:
                raise UserError(f"colour jitter {name} must be a probability in [0, 1], got {p!r}")
        self.strength, self.p_jitter, self.p_grey = float(strength), float(p_jitter), float(p_grey)

    def __repr__(self):
        return f"ColorJitter({self.strength}, p_jitter={self.p_jitter}, p_grey={self.p_grey})"

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"colour jitter: expected B x 3 x H x W RGB images, got shape {tuple(images.shape)}")
        if self.strength == 0:
            return images
        batch = images.shape[0]
        uniform = torch.rand(batch, 6, dtype=torch.float64, **random_source(images.device, generator))
        uniform = uniform.to(images.device)
        span = 0.8 * self.strength
        low = max(0.0, 1.0 - span)
        factors = (low + (1.0 + span - low) * uniform[:, :3]).to(images.dtype)
        turns = ((2 * uniform[:, 3] - 1) * 0.2 * self.strength).to(images.dtype)
        jitter = (uniform[:, 4] < self.p_jitter).to(images.dtype)
        greyed = uniform[:, 5] < self.p_grey
        # a sample without jitter gets factors 1 and no turn: each operation is then the identity
        factors = 1 + jitter[:, None] * (factors - 1)
        turns = jitter * turns
        out = _blend(images, torch.zeros_like(images), factors[:, 0])  # brightness
        out = _blend(out, grey(out).mean((2, 3), keepdim=True), factors[:, 1])  # contrast
        out = _blend(out, grey(out), factors[:, 2])  # saturation
        out = turn_hue(out, turns)
        return torch.where(greyed.view(-1, 1, 1, 1), grey(out).expand_as(out), out)
