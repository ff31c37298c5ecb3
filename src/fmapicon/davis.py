"""DAVIS files: the palette, indexed annotation PNGs, and (later) layouts and sequence lists.

Annotations come in two styles and both are read as ``H x W`` uint8 object ids:
DAVIS-2017 indexed (palette) PNGs with ids 1..K (255 = void), and DAVIS-2016
grayscale PNGs with 0 = background and 255 = the single object, read as id 1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fmapicon.errors import UserError


def davis_palette() -> np.ndarray:
    """The DAVIS (PASCAL VOC) palette: 256 x 3 uint8, id 0 black, 1 (128, 0, 0), 2 (0, 128, 0), ...

    Colour k spreads the bits of k over the high bits of R, G and B, three at a time.
    """
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, red, green, blue = index, 0, 0, 0
        for shift in range(7, -1, -1):
            red |= ((value >> 0) & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (red, green, blue)
    return palette


def write_indexed_png(path, ids: np.ndarray) -> None:
    """Write an ``H x W`` array of object ids as an indexed PNG in the DAVIS palette."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"object ids must be H x W, got shape {ids.shape}")
    if ids.min(initial=0) < 0 or ids.max(initial=0) > 255:
        raise ValueError(f"object ids must be in 0..255, got {ids.min()}..{ids.max()}")
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette(davis_palette().reshape(-1).tolist())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def read_annotation(path) -> np.ndarray:
    """Read a DAVIS annotation as ``H x W`` uint8 ids (2016 0/255 grayscale -> 0/1; 255 stays void in 2017)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no annotation at {path}")
    try:
        with Image.open(path) as image:
            mode = image.mode
            ids = np.array(image)
    except OSError as error:
        raise UserError(f"cannot read annotation {path}: {error}") from error
    if mode == "P":
        return ids.astype(np.uint8)
    if ids.ndim == 3:  # an RGB(A) mask: any non-black pixel is the object
        ids = ids[..., :3].max(axis=2)
    # DAVIS-2016 style grayscale: 0 background, anything else (255) the single object
    return (ids > 127).astype(np.uint8) if mode in ("L", "RGB", "RGBA", "I", "I;16", "1") else ids.astype(np.uint8)
