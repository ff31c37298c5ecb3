"""Hand-made colour features: CIE Lab patches, the ``pixels`` baseline's features, and
``fuse_features``, which joins two unit feature maps so that their cosines add with weights.

``LabPatches`` is what ``fmapicon eval --model pixels`` matches with, and the colour half
of ``eval --pixels-weight`` (``fuse_features``). Formulas: sRGB -> linear RGB -> XYZ (D65) -> CIE Lab as in IEC 61966-2-1 and
CIE 15 (the matrix and white point of ``skimage.color.rgb2lab``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fmapicon.errors import UserError


def rgb_to_lab(images: torch.Tensor) -> torch.Tensor:
    """CIE Lab (D65 white) of sRGB images ``B x 3 x H x W`` in [0, 1]: L in [0, 100], a and b
    roughly in [-128, 127]."""
    rgb = images.clamp(0, 1)
    linear = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    to_xyz = torch.tensor([[0.412453, 0.357580, 0.180423],
                           [0.212671, 0.715160, 0.072169],
                           [0.019334, 0.119193, 0.950227]], dtype=images.dtype, device=images.device)
    white = torch.tensor([0.95047, 1.0, 1.08883], dtype=images.dtype, device=images.device)
    xyz = torch.einsum("ij,bjhw->bihw", to_xyz, linear) / white[:, None, None]
    delta = 6 / 29
    f = torch.where(xyz > delta**3, xyz.clamp_min(1e-12) ** (1 / 3), xyz / (3 * delta**2) + 4 / 29)
    fx, fy, fz = f.unbind(dim=1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def default_patch(stride: int) -> int:
    """The ``pixels`` neighbourhood side in cells, ``2 ceil(8 / stride) + 1``: it reaches at
    least 8 pixels beyond the cell on each side (3 at stride 8, 5 at stride 4)."""
    return 2 * math.ceil(8 / stride) + 1


class LabPatches(nn.Module):
    """``pixels`` baseline: ``B x 3 x H x W`` -> ``B x 3 patch^2 x H/stride x W/stride``
    (H, W multiples of ``stride``).

    ``z = ((L - 50) / 20, a / 10, b / 10)`` averaged over stride x stride cells; each cell
    with its patch x patch neighbours (edges replicated), channel-major. The scaling gives
    L, a and b comparable spread: unscaled, L (spread ~20) outweighed a and b (~5-10) and
    the patches' cosines were all close to 1, so matching was ambiguous. Not normalized
    (FeatureModel does it).
    """

    centre, scale = (50.0, 0.0, 0.0), (20.0, 10.0, 10.0)

    def __init__(self, stride: int = 8, patch: int | None = None):
        super().__init__()
        patch = default_patch(stride) if patch is None and stride >= 1 else patch
        if stride < 1 or patch is None or patch < 1 or patch % 2 == 0:
            raise UserError(f"pixels needs stride >= 1 and an odd patch >= 1, got stride={stride}, patch={patch}")
        self.stride, self.patch, self.channels = stride, patch, 3 * patch * patch

    def forward(self, images):
        centre, scale = (images.new_tensor(v)[:, None, None] for v in (self.centre, self.scale))
        cells = F.avg_pool2d((rgb_to_lab(images) - centre) / scale, self.stride)
        half = self.patch // 2
        padded = F.pad(cells, (half, half, half, half), mode="replicate")
        batch, channels, height, width = cells.shape
        return F.unfold(padded, self.patch).view(batch, channels * self.patch**2, height, width)


def fuse_features(first: torch.Tensor, second: torch.Tensor, weight: float) -> torch.Tensor:
    """Two unit feature maps of the same cells as one whose cosines are their weighted sum.

    ``first`` ``B x C1 x h x w`` and ``second`` ``B x C2 x h x w``, each L2-normalized per
    cell -> ``B x (C1 + C2) x h x w`` unit cells ``[sqrt(1 - weight) first, sqrt(weight) second]``,
    so that ``<u_q, u_k> = (1 - weight) <first_q, first_k> + weight <second_q, second_k>``:
    a convex combination of the two affinities (cue fusion, as colour and motion cues are
    combined in classical label propagation). ``ValueError`` for a weight outside [0, 1] or
    maps of different batch or grid.
    """
    if not 0 <= weight <= 1:
        raise ValueError(f"fuse_features: weight must be in [0, 1], got {weight}")
    if first.shape[0] != second.shape[0] or first.shape[-2:] != second.shape[-2:]:
        raise ValueError(f"fuse_features: maps of different frames or cells, {tuple(first.shape)} and "
                         f"{tuple(second.shape)}")
    return torch.cat([math.sqrt(1 - weight) * first, math.sqrt(weight) * second.to(first.dtype)], dim=1)
