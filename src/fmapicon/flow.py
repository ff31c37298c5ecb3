"""Optical flow fields: Middlebury ``.flo`` files, end-point error, warping.

A flow is an ``H x W x 2`` float32 array (numpy) or a ``B x 2 x H x W`` tensor of
displacements in pixels, (u, v) = (x, y): the pixel at (x, y) of the first image
moves to (x + u, y + v) in the second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fmapicon.errors import UserError

FLO_MAGIC = 202021.25


def write_flo(path, flow: np.ndarray) -> None:
    """Write an ``H x W x 2`` flow as Middlebury .flo (float32 magic, int32 W, int32 H, data)."""
    flow = np.asarray(flow, dtype=np.float32)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"a flow must be H x W x 2, got shape {flow.shape}")
    height, width = flow.shape[:2]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.array([FLO_MAGIC], dtype="<f4").tofile(handle)
        np.array([width, height], dtype="<i4").tofile(handle)
        flow.astype("<f4").tofile(handle)


def read_flo(path) -> np.ndarray:
    """Read a Middlebury .flo file as an ``H x W x 2`` float32 array (u, v in pixels)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no flow file at {path}")
    data = path.read_bytes()
    if len(data) < 12:
        raise UserError(f"{path} is not a .flo file: {len(data)} bytes, expected a 12-byte header")
    magic = np.frombuffer(data, dtype="<f4", count=1)[0]
    if magic != np.float32(FLO_MAGIC):
        raise UserError(f"{path} is not a .flo file: magic {magic!r}, expected {FLO_MAGIC}")
    width, height = (int(v) for v in np.frombuffer(data, dtype="<i4", count=2, offset=4))
    expected = 12 + width * height * 2 * 4
    if width <= 0 or height <= 0 or len(data) != expected:
        raise UserError(f"{path}: header says {width} x {height} ({expected} bytes), file has {len(data)} bytes")
    return np.frombuffer(data, dtype="<f4", offset=12).reshape(height, width, 2).astype(np.float32)
