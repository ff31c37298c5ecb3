"""Optical flow fields: Middlebury ``.flo`` files, end-point error, warping, colours.

A flow is an ``H x W x 2`` float32 array (numpy) or a ``B x 2 x H x W`` tensor of
displacements in pixels, (u, v) = (x, y): the pixel at (x, y) of the first image
moves to (x + u, y + v) in the second. Pixel centres sit at integer coordinates.

- ``read_flo`` / ``write_flo``: the Middlebury file format.
- ``end_point_error`` / ``epe_stats``: |flow - gt| per pixel and its summary.
- ``warp_image`` (alias ``warp``): backward warping, ``output(x) = image(x + flow(x))``.
- ``resize_flow``: resample a field and rescale its displacements (cells -> pixels).
- ``FlowPair`` / ``flow_pairs``: two frames and the true flow between them.

Flow pictures (the Middlebury colour wheel) are ``fmapicon.experiments.figures.flow_to_color``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmapicon.errors import UserError

FLO_MAGIC = 202021.25


def write_flo(path, flow: np.ndarray) -> None:
    """Write an ``H x W x 2`` flow as Middlebury .flo (float32 magic, int32 W, int32 H, data),
    atomically (``fmapicon.runtime.atomic_write``): a reader never sees half a file."""
    flow = np.asarray(flow, dtype=np.float32)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"a flow must be H x W x 2, got shape {flow.shape}")
    height, width = flow.shape[:2]
    from fmapicon.runtime import atomic_write

    with atomic_write(Path(path), "wb") as handle:
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


def flow_triples(folder) -> list[tuple[str, Path, Path, Path]]:
    """FlyingChairs-style triples in ``folder``, sorted: ``(stem, NNNNN-img0.EXT,
    NNNNN-img1.EXT, NNNNN-gt.flo)`` for each stem with all three files (any image EXT that
    PIL reads; FlyingChairs uses .ppm). Raises UserError when the folder is missing or
    holds no complete triple."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of FlyingChairs-style pairs (NNNNN-img0.ppm, -img1.ppm, -gt.flo)")
    triples = []
    from fmapicon.data.sources import natural_sorted

    for first in natural_sorted(folder.glob("*-img0.*")):
        stem = first.name[: -len("-img0" + first.suffix)]
        second, flow = first.with_name(f"{stem}-img1{first.suffix}"), folder / f"{stem}-gt.flo"
        if second.is_file() and flow.is_file():
            triples.append((stem, first, second, flow))
    if not triples:
        raise UserError(f"no pairs in {folder}: expected NNNNN-img0.ppm, NNNNN-img1.ppm and NNNNN-gt.flo")
    return triples


@dataclass
class FlowPair:
    """Two frames and the true flow from A to B, in memory (``a``, ``b``: ``H x W x 3`` uint8
    RGB; ``flow``: ``H x W x 2`` float32) or as the paths of their files (``load`` reads them).
    ``dataset`` names where the pair comes from (``flyingchairs``, ``synth``)."""

    name: str
    a: object
    b: object
    flow: object
    dataset: str = ""

    def load(self) -> FlowPair:
        """The pair with its frames (``fmapicon.data.images.read_image``) and flow (``read_flo``) read."""
        from fmapicon.data.images import read_image

        return dataclasses.replace(self, a=read_image(self.a), b=read_image(self.b), flow=read_flo(self.flow))


def flow_pairs(folder, dataset: str = "flyingchairs") -> list[FlowPair]:
    """The FlyingChairs-style triples of ``folder`` (``flow_triples``) as pairs of file paths."""
    return [FlowPair(stem, a, b, flow, dataset) for stem, a, b, flow in flow_triples(folder)]


# Middlebury marks pixels whose flow is unknown with a component above 1e9 (its code's
# UNKNOWN_FLOW_THRESH; files use 1e10); NaN and infinity mean the same here.
UNKNOWN_FLOW = 1e9


def known_flow(flow):
    """Where a flow is known: both components finite and of magnitude <= 1e9.

    ``flow``: numpy ``H x W x 2`` (-> ``H x W`` bool) or tensor ``B x 2 x H x W``
    (-> ``B x H x W`` bool)."""
    if _is_tensor(flow):
        return (flow.isfinite() & (flow.abs() <= UNKNOWN_FLOW)).all(dim=1)
    flow = np.asarray(flow)
    with np.errstate(invalid="ignore"):
        return (np.isfinite(flow) & (np.abs(flow) <= UNKNOWN_FLOW)).all(axis=-1)


def max_known_length(flow) -> float:
    """The longest displacement (pixels) of an ``H x W x 2`` flow over its known pixels; 0
    when none is known."""
    flow = to_numpy_hw2(flow).astype(np.float64)
    known = known_flow(flow)
    return float(np.hypot(flow[..., 0], flow[..., 1])[known].max(initial=0.0))


def end_point_error(flow, gt):
    """Per-pixel end-point error ``|flow - gt|`` (Euclidean norm of the difference, pixels);
    NaN where either flow is unknown (``known_flow``).

    Parameters
    ----------
    flow, gt : ``H x W x 2`` numpy arrays, or ``B x 2 x H x W`` tensors (same shape).

    Returns
    -------
    ``H x W`` float array (numpy), or ``B x H x W`` tensor.
    """
    if _is_tensor(flow) or _is_tensor(gt):
        _check_same_shape(flow, gt, "B x 2 x H x W")
        error = (flow.float() - gt.float()).norm(dim=1)
        return error.masked_fill(~(known_flow(flow) & known_flow(gt)), float("nan"))
    flow, gt = np.asarray(flow, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    _check_same_shape(flow, gt, "H x W x 2")
    known = known_flow(flow) & known_flow(gt)
    with np.errstate(invalid="ignore", over="ignore"):
        error = np.sqrt(((flow - gt) ** 2).sum(axis=-1))
    return np.where(known, error, np.nan)


def epe_stats(flow, gt) -> dict:
    """End-point error statistics of an ``H x W x 2`` flow against the ground truth.

    Returns ``{"epe_mean", "epe_median", "outliers_3px", "known_pixels",
    "unknown_gt_pixels", "unknown_flow_pixels"}``: the mean and median end-point error in
    pixels and the share of pixels whose error exceeds 3 pixels, over the pixels where both
    flows are known (``known_flow``: finite, components <= 1e9, the Middlebury marker), and
    how many pixels were left out because the ground truth, or else the estimate, is
    unknown there. FlyingChairs has no unknown pixel. Raises UserError when no pixel is left.
    """
    flow, gt = to_numpy_hw2(flow), to_numpy_hw2(gt)
    error = end_point_error(flow, gt)
    gt_known = known_flow(gt)
    known = gt_known & known_flow(flow)
    if not known.any():
        raise UserError(f"no pixel has both a known ground-truth flow and a known estimate "
                        f"({int((~gt_known).sum())} of {gt_known.size} ground-truth pixels are unknown: "
                        "non-finite or beyond 1e9)")
    error = error[known]
    return {
        "epe_mean": float(error.mean()),
        "epe_median": float(np.median(error)),
        "outliers_3px": float((error > 3.0).mean()),
        "known_pixels": int(known.sum()),
        "unknown_gt_pixels": int((~gt_known).sum()),
        "unknown_flow_pixels": int((gt_known & ~known).sum()),
    }


def warp_image(image, flow, *, mode: str = "bilinear", padding: str = "zeros"):
    """Backward warping: ``output(x) = image(x + flow(x))``, sampled at sub-pixel points.

    With the forward flow of a pair (frame 0 -> frame 1), ``warp_image(frame1, flow)``
    pulls frame 1's pixels back onto frame 0's grid and reproduces frame 0 wherever the
    pixel stays visible. The output lies on the flow's grid; the image may have another
    size (coordinates are its pixel indices, pixel centres at integers).

    Parameters
    ----------
    image : numpy ``H' x W`` or ``H' x W' x C``, or tensor ``B x C x H' x W'``.
    flow : numpy ``H x W x 2`` or tensor ``B x 2 x H x W`` (u, v) in pixels.
    mode : ``"bilinear"`` for images, ``"nearest"`` for masks and labels.
    padding : ``"zeros"`` (points outside the image read 0) or ``"border"`` (the
        nearest edge pixel).

    Returns
    -------
    The same kind, dtype and channel layout as ``image``, on the flow's grid. Integer
    images are rounded back (nearest mode keeps labels exact).
    """
    import torch

    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    if padding not in ("zeros", "border"):
        raise ValueError(f"padding must be 'zeros' or 'border', got {padding!r}")
    if _is_tensor(image):
        return _warp_tensor(image, flow, mode, padding)
    image = np.asarray(image)
    flow = to_numpy_hw2(flow)
    channels_last = image if image.ndim == 3 else image[..., None]
    # float64 keeps integer shifts exact to ~1e-12 through the grid normalization
    source = torch.from_numpy(np.ascontiguousarray(channels_last.transpose(2, 0, 1), dtype=np.float64))[None]
    displacement = torch.from_numpy(np.ascontiguousarray(flow.transpose(2, 0, 1), dtype=np.float64))[None]
    warped = _sample(source, displacement, mode, padding)[0].numpy().transpose(1, 2, 0)
    warped = warped if image.ndim == 3 else warped[..., 0]
    return _cast_like(warped, image.dtype)


warp = warp_image


def _warp_tensor(image, flow, mode: str, padding: str):
    if image.ndim != 4 or flow.ndim != 4 or flow.shape[1] != 2 or flow.shape[0] != image.shape[0]:
        raise ValueError(
            f"expected image B x C x H' x W' and flow B x 2 x H x W, got {tuple(image.shape)} and {tuple(flow.shape)}")
    dtype = image.dtype if image.is_floating_point() else flow.dtype
    warped = _sample(image.to(dtype), flow.to(dtype), mode, padding)
    if image.is_floating_point():
        return warped
    return warped.round().to(image.dtype)


def _sample(image, flow, mode: str, padding: str):
    """``image(x + flow(x))`` with grid_sample (align_corners=True: pixel centres at integers)."""
    import torch
    import torch.nn.functional as F

    batch, _, height, width = flow.shape
    in_height, in_width = image.shape[-2:]
    ys = torch.arange(height, dtype=flow.dtype, device=flow.device).view(1, height, 1)
    xs = torch.arange(width, dtype=flow.dtype, device=flow.device).view(1, 1, width)
    # map pixel index p in [0, n-1] to [-1, 1]; a 1-pixel axis maps everything to its pixel
    grid_x = 2 * (xs + flow[:, 0]) / max(in_width - 1, 1) - 1
    grid_y = 2 * (ys + flow[:, 1]) / max(in_height - 1, 1) - 1
    grid = torch.stack([grid_x, grid_y], dim=-1)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=True)


def _cast_like(array: np.ndarray, dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(array), info.min, info.max).astype(dtype)
    if dtype == np.bool_:
        return array >= 0.5
    return array.astype(dtype)


def resize_flow(flow, size):
    """Resample a displacement field to ``size = (H', W')`` and rescale its displacements.

    Bilinear with align_corners=False (each of the H x W values is the centre of a cell
    of H'/H x W'/W output pixels); u is multiplied by W'/W and v by H'/H, so a flow in
    feature cells becomes a flow in pixels.

    Parameters
    ----------
    flow : numpy ``H x W x 2`` or tensor ``B x 2 x H x W``.
    size : ``(H', W')``.
    """
    import torch
    import torch.nn.functional as F

    new_height, new_width = (int(s) for s in size)
    if new_height <= 0 or new_width <= 0:
        raise ValueError(f"size must be positive, got {size}")
    as_numpy = not _is_tensor(flow)
    field = torch.from_numpy(np.ascontiguousarray(to_numpy_hw2(flow).transpose(2, 0, 1)))[None] if as_numpy else flow
    if field.is_floating_point():  # unknown stays unknown: NaN spreads to the cells it touches
        field = torch.where(known_flow(field)[:, None], field, torch.full_like(field, float("nan")))
    height, width = field.shape[-2:]
    resized = F.interpolate(field.float(), size=(new_height, new_width), mode="bilinear", align_corners=False)
    ratio = torch.tensor([new_width / width, new_height / height], dtype=resized.dtype, device=resized.device)
    resized = resized * ratio.view(1, 2, 1, 1)
    if as_numpy:
        return resized[0].numpy().transpose(1, 2, 0).astype(np.float32)
    return resized.to(flow.dtype) if flow.is_floating_point() else resized


def _is_tensor(value) -> bool:
    return type(value).__module__.startswith("torch")


def to_numpy_hw2(flow) -> np.ndarray:
    """An ``H x W x 2`` numpy view of a numpy flow, or of a ``2 x H x W``/``1 x 2 x H x W`` tensor."""
    if _is_tensor(flow):
        flow = flow.detach().cpu()
        flow = flow[0] if flow.ndim == 4 and flow.shape[0] == 1 else flow
        if flow.ndim != 3 or flow.shape[0] != 2:
            raise ValueError(f"expected a 2 x H x W or 1 x 2 x H x W flow tensor, got {tuple(flow.shape)}")
        return flow.permute(1, 2, 0).numpy()
    flow = np.asarray(flow)
    if flow.ndim != 3 or flow.shape[2] != 2:
        raise ValueError(f"a flow must be H x W x 2, got shape {flow.shape}")
    return flow


def _check_same_shape(flow, gt, layout: str) -> None:
    if tuple(flow.shape) != tuple(gt.shape):
        raise UserError(
            f"the flow and the ground truth differ in size: {tuple(flow.shape)} vs {tuple(gt.shape)} "
            f"(both {layout}); resample one with resize_flow first")
