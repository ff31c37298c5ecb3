"""Image files as RGB pixels: the one reader and the one uint8 -> float conversion.

Every command reads frames, match inputs and training frames through ``read_image`` (or
``rgb_image`` on an open Pillow image), so that a picture gives the same array whatever
reads it and whatever mode it was saved in:

- 8-bit RGB: as stored;
- grey (``L``), palette (``P``), ``CMYK``, ``YCbCr``, with alpha (``RGBA``, ``LA``, ``PA``):
  Pillow's conversion to RGB (palette looked up; alpha dropped, the stored colour kept;
  CMYK through Pillow's naive inverse);
- 16-bit (``I;16*``), 32-bit integer (``I``) and float (``F``) grey: scaled to 0..255 by
  their depth, rounded, never clipped (``I;16``: / 65535; ``I``: 255 or 65535 by the
  largest value; ``F``: 1, 255 or 65535 by the largest value; NaN and infinity as 0), then
  grey repeated in the three channels. An 8-bit and a 16-bit save of one picture read
  the same (to the rounding of 65535 / 255 = 257 per level: exactly).

Masks have their own rules (``fmapicon.data.davis.read_annotation``): ids, not colours.

``to_tensor`` turns uint8 ``... x H x W x 3`` pixels into float ``... x 3 x H x W`` in
[0, 1] (x / 255 in float32, correctly rounded), the one conversion used by evaluation,
correspondence and training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fmapicon.errors import UserError

DEEP_MODES = ("I", "F")  # and every "I;16*" mode


def rgb_image(image: Image.Image) -> Image.Image:
    """``image`` in Pillow's ``RGB`` mode by the rules of the module docstring."""
    mode = image.mode
    if mode in DEEP_MODES or mode.startswith("I;16"):
        return Image.fromarray(_deep_grey(image)).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def _deep_grey(image: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grey image as ``H x W`` uint8, scaled by its depth."""
    array = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(array.max(initial=0))
    if image.mode.startswith("I;16"):
        full = 65535.0
    elif image.mode == "F" and top <= 1.0:
        full = 1.0
    else:
        full = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
    return np.clip(np.round(array / full * 255.0), 0, 255).astype(np.uint8)


def read_image(path) -> np.ndarray:
    """The picture in ``path`` as ``H x W x 3`` uint8 RGB (``rgb_image``'s rules).

    Raises ``UserError`` naming the file when it is missing or not a readable image.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no image at {path}: expected an existing image file (PNG, JPEG, PPM, TIFF, ...)")
    try:
        with Image.open(path) as image:
            return np.asarray(rgb_image(image))
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise UserError(f"cannot read {path} as an image ({error}); expected PNG, JPEG, PPM, TIFF, ...") from error


def to_tensor(pixels, device=None):
    """uint8 pixels ``[T x] H x W x 3`` -> float32 ``[T x] 3 x H x W`` in [0, 1] (x / 255).

    ``pixels`` : a numpy array (read-only is fine: the result is a new tensor)
    ``device`` : where the result goes (default: the CPU)
    Raises ``TypeError`` for another dtype and ``ValueError`` for another shape.
    """
    import torch

    array = np.asarray(pixels)
    if array.dtype != np.uint8:
        raise TypeError(f"to_tensor expects uint8 pixels, got {array.dtype}")
    if array.ndim not in (3, 4) or array.shape[-1] != 3:
        raise ValueError(f"to_tensor expects [T x] H x W x 3 pixels, got shape {array.shape}")
    # numpy, not torch ops: tiny tensor ops in many DataLoader workers contend for torch's threads
    scaled = np.ascontiguousarray(np.moveaxis(array, -1, -3), dtype=np.float32) / np.float32(255)
    tensor = torch.from_numpy(scaled)
    return tensor if device is None else tensor.to(device)
