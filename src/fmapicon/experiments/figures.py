"""Figures: every picture the package draws, from numbers other modules computed.

- training curves from a run's ``metrics.jsonl``: the loss, and ``log_p`` against
  ``log_p_shuffled`` (equal curves mean a positional code, attempt 0 of the writeup);
- PCA-colour pictures of feature maps: the top three principal components of the
  ``C``-dimensional features, one per colour channel, the way the writeup shows features;
- propagated masks as a translucent overlay in the DAVIS palette;
- heat maps (the inverse-consistency error |Phi^AB(Phi^BA(x)) - x|), in matplotlib's
  colour maps (the one source of colour maps here: ``heat_colors``, ``plot_heatmap``);
- flows in the Middlebury colour coding (``flow_to_color``) and the labelled picture of
  a match (``match_picture``);
- grids of pictures (``picture_grid``) and PNG files (``save_png``).

matplotlib is optional (``pip install 'fmapicon[plots]'``) and is imported lazily with the
Agg backend; arrays are numpy (torch tensors are accepted and moved to the CPU).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from fmapicon.data.flow import known_flow, max_known_length, to_numpy_hw2, warp_image
from fmapicon.errors import UserError
from fmapicon.runtime import atomic_write, require

#: colours of the curves, one per run in comparisons (matplotlib's tab10, colour-blind safer order)
_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


# --------------------------------------------------------------------------- helpers


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _numpy(array) -> np.ndarray:
    """A numpy array from a numpy array or a torch tensor (detached, on the CPU)."""
    if hasattr(array, "detach"):
        array = array.detach().float().cpu().numpy()
    return np.asarray(array)


def save_png(path, image) -> Path:
    """Write an ``H x W x 3`` (or ``H x W``) uint8 array as a PNG, atomically."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"save_png wants uint8 pixels, got {image.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    path = Path(path)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return path


def _save_figure(figure, path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(figure)
    path = Path(path)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return path


def to_uint8_image(image) -> np.ndarray:
    """An image as ``H x W x 3`` uint8: accepts ``3 x H x W`` or ``H x W x 3`` floats in [0, 1] or uint8."""
    image = _numpy(image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[2] != 3:
        image = image.transpose(1, 2, 0)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"an image must be H x W x 3 or 3 x H x W, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- training curves


def read_metrics(path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a run folder or the file), in order; a torn last line is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"no training metrics at {path}: expected a run folder with metrics.jsonl")
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write; the rest of the file is still good
    return records


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that carry a finite ``key``."""
    pairs = [(r["step"], r[key]) for r in records
             if "step" in r and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pairs)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    if window <= 1 or values.size < 3:
        return values
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, values.size + 1), window)
    starts = np.arange(1, values.size + 1) - counts
    return (cumulative[np.arange(1, values.size + 1)] - cumulative[starts]) / counts


def plot_training_curves(metrics, path, title: str | None = None, smooth: int | None = None) -> Path:
    """Two panels from a run's metrics: the loss (-log_p, plus any penalty) and log_p vs log_p_shuffled.

    Parameters
    ----------
    metrics : path of a run folder / metrics.jsonl, or a list of records (dicts with ``step``).
    path : the PNG to write.
    smooth : moving-average window for the noisy per-step curves (default: about 1/20 of the points).
        The raw values are drawn faint behind the smoothed line.

    When ``log_p`` and ``log_p_shuffled`` coincide the features do not depend on the
    image pair: the positional code of the writeup's attempt 0. The dashed line at 0 is the
    perfect score such a code reaches.
    """
    records = metrics if isinstance(metrics, list) else read_metrics(metrics)
    steps, loss = _series(records, "loss")
    if steps.size == 0:
        raise UserError("the metrics have no finite 'loss' values to plot (did training log any step?)")
    window = smooth or max(1, steps.size // 20)
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    _faint_and_smooth(left, steps, loss, window, _COLOURS[0], "loss")
    left.set_title("training loss")
    for key, colour, label in [("log_p", _COLOURS[0], "log_p (true pairs)"),
                               ("log_p_shuffled", _COLOURS[1], "log_p_shuffled (pairs from different videos)")]:
        x, y = _series(records, key)
        if x.size:
            _faint_and_smooth(right, x, y, window if key == "log_p" else 1, colour, label)
    right.axhline(0.0, color="grey", linestyle="--", linewidth=0.8)
    right.set_title("log P[Phi_AB(Phi_BA(x)) = x]  (higher is better, 0 is perfect)")
    right.legend(fontsize=8, loc="best")
    for axis in (left, right):
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return _save_figure(figure, path)


def _faint_and_smooth(axis, x, y, window, colour, label) -> None:
    if window > 1:
        axis.plot(x, y, color=colour, alpha=0.25, linewidth=0.8)
        axis.plot(x, _smooth(y, window), color=colour, linewidth=1.8, label=label)
    else:
        axis.plot(x, y, color=colour, linewidth=1.5, marker="." if x.size < 30 else None, label=label)


def plot_log_p_comparison(runs: dict, path, title: str | None = None) -> Path:
    """log_p (solid) and log_p_shuffled (dashed) of several runs in one plot, one colour per run.

    ``runs`` maps a label (e.g. ``"attempt 0: none"``) to a run folder, a metrics.jsonl
    path or a list of records. Used by ``fmapicon ablate`` to show the writeup's story.
    """
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for index, (label, metrics) in enumerate(runs.items()):
        records = metrics if isinstance(metrics, list) else read_metrics(metrics)
        colour = _COLOURS[index % len(_COLOURS)]
        steps, log_p = _series(records, "log_p")
        marker = "o" if steps.size < 30 else None  # a short run stays visible
        if steps.size:
            axis.plot(steps, _smooth(log_p, max(1, steps.size // 20)), color=colour, linewidth=1.8,
                      marker=marker, markersize=3, label=f"{label}: log_p")
        steps, shuffled = _series(records, "log_p_shuffled")
        if steps.size:
            axis.plot(steps, shuffled, color=colour, linewidth=1.2, linestyle="--", marker=marker,
                      markersize=3, label=f"{label}: log_p_shuffled")
    axis.axhline(0.0, color="grey", linestyle=":", linewidth=0.8)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("log P[Phi_AB(Phi_BA(x)) = x]")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2, loc="best")
    axis.set_title(title or "log_p (solid) vs log_p_shuffled (dashed): equal curves = positional code")
    figure.tight_layout()
    return _save_figure(figure, path)


# --------------------------------------------------------------------------- feature pictures


def pca_colors(features, percentile: float = 1.0) -> list[np.ndarray]:
    """Colour feature maps by their top three principal components (R, G, B).

    Parameters
    ----------
    features : one ``C x h x w`` feature map or a list of them (numpy or torch; ``1 x C x h x w``
        is accepted). A list is projected on ONE basis fitted to all its pixels together, so
        the same colour means the same feature across the pictures (e.g. frame A and frame B).
    percentile : each component is stretched to [0, 1] between its ``percentile`` and
        ``100 - percentile`` percentiles over all pixels (robust to a few outliers).

    Returns
    -------
    list of ``h x w x 3`` uint8 pictures, one per map.

    Maths: with X the ``N x C`` pixels, centred by their mean mu, the right singular
    vectors v_1, v_2, v_3 of X - mu (largest singular values first) give the colour
    channels k = (x - mu) . v_k. A singular vector's sign is arbitrary, so each v_k is
    flipped to make its largest-magnitude entry positive: the picture is reproducible.
    With fewer than three channels (or a rank below three) the missing channels are 0.5 grey.
    """
    maps = [_feature_map(f) for f in (features if isinstance(features, (list, tuple)) else [features])]
    channels = maps[0].shape[0]
    if any(m.shape[0] != channels for m in maps):
        raise ValueError(f"all feature maps must have the same channels, got {[m.shape[0] for m in maps]}")
    pixels = np.concatenate([m.reshape(channels, -1).T for m in maps]).astype(np.float64)
    mean = pixels.mean(axis=0)
    _, singular, basis = np.linalg.svd(pixels - mean, full_matrices=False)
    components = _signed(basis[:3])
    rank = int((singular[:3] > singular[0] * 1e-6).sum()) if singular.size and singular[0] > 0 else 0
    projected = (pixels - mean) @ components.T
    colours = np.full((pixels.shape[0], 3), 0.5)
    for k in range(rank):
        low, high = np.percentile(projected[:, k], [percentile, 100.0 - percentile])
        colours[:, k] = np.clip((projected[:, k] - low) / max(high - low, 1e-12), 0.0, 1.0)
    pictures, start = [], 0
    for m in maps:
        count = m.shape[1] * m.shape[2]
        picture = colours[start:start + count].reshape(m.shape[1], m.shape[2], 3)
        pictures.append((picture * 255.0 + 0.5).astype(np.uint8))
        start += count
    return pictures


def _feature_map(features) -> np.ndarray:
    array = _numpy(features)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"a feature map must be C x h x w (or 1 x C x h x w), got shape {array.shape}")
    return array


def _signed(basis: np.ndarray) -> np.ndarray:
    """Flip each row so that its largest-magnitude entry is positive."""
    if basis.size == 0:
        return basis
    peaks = basis[np.arange(basis.shape[0]), np.abs(basis).argmax(axis=1)]
    return basis * np.where(peaks < 0, -1.0, 1.0)[:, None]


def upscale(image: np.ndarray, height: int, width: int, nearest: bool = True) -> np.ndarray:
    """Resize an ``h x w x 3`` uint8 picture to ``height x width`` (nearest keeps feature cells visible)."""
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(image).resize((width, height), resample))


def feature_pictures(model, frames) -> list[np.ndarray]:
    """PCA-colour pictures of ``model``'s features on ``frames`` (pairs of an ``H x W x 3`` uint8
    frame and the cell size in pixels), one PCA basis shared by all, each upscaled to its frame."""
    from fmapicon.evaluation.correspond import features_at_stride
    from fmapicon.data.images import to_tensor

    maps = [features_at_stride(model, to_tensor(frame, model.device)[None], cell)[0].cpu() for frame, cell in frames]
    return [upscale(picture, *frame.shape[:2]) for picture, (frame, _) in zip(pca_colors(maps), frames)]


# --------------------------------------------------------------------------- masks and heat maps


def overlay_mask(frame, ids, alpha: float = 0.5, outline: bool = True) -> np.ndarray:
    """A frame with object masks drawn as translucent colours of the DAVIS palette.

    Parameters
    ----------
    frame : ``H x W x 3`` uint8 (or a float image in [0, 1], ``3 x H x W`` accepted).
    ids : ``H x W`` integer object ids (0 = background, 255 = void, drawn as is).
    alpha : opacity of the colour over each object pixel.
    outline : also draw each object's boundary opaque, so thin masks stay visible.

    Returns ``H x W x 3`` uint8: ``(1 - alpha) * frame + alpha * palette[id]`` on object pixels.
    """
    from fmapicon.data.davis import davis_palette

    frame = to_uint8_image(frame)
    ids = _numpy(ids).astype(np.int64)
    if ids.shape != frame.shape[:2]:
        raise ValueError(f"mask shape {ids.shape} does not match the frame's {frame.shape[:2]}")
    palette = davis_palette().astype(np.float64)
    colour = palette[np.clip(ids, 0, 255)]
    objects = (ids > 0)[..., None]
    blended = np.where(objects, (1.0 - alpha) * frame + alpha * colour, frame)
    if outline:
        edge = _boundary(ids)[..., None]
        blended = np.where(edge, colour, blended)
    return (blended + 0.5).astype(np.uint8)


def _boundary(ids: np.ndarray) -> np.ndarray:
    """Object pixels with a 4-neighbour of another id."""
    edge = np.zeros(ids.shape, dtype=bool)
    edge[:-1] |= ids[:-1] != ids[1:]
    edge[1:] |= ids[1:] != ids[:-1]
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    return edge & (ids > 0)


def plot_heatmap(values, path, title: str, unit: str = "pixels", vmax: float | None = None,
                 cmap: str = "magma") -> Path:
    """A heat map with a colour bar, e.g. the inverse-consistency error |Phi^AB(Phi^BA(x)) - x|.

    ``values`` is ``H x W``; ``vmax`` defaults to the 99th percentile so that a few
    outliers do not wash the picture out. The title gets the mean appended.
    """
    values = _numpy(values).astype(np.float64)
    if values.ndim != 2:
        raise ValueError(f"a heat map needs H x W values, got shape {values.shape}")
    finite = values[np.isfinite(values)]
    top = vmax if vmax is not None else (float(np.percentile(finite, 99)) if finite.size else 1.0)
    plt = _pyplot()
    height, width = values.shape
    figure, axis = plt.subplots(figsize=(4.2 * width / max(height, width) + 1.0, 4.2 * height / max(height, width)))
    shown = axis.imshow(values, cmap=cmap, vmin=0.0, vmax=max(top, 1e-6), interpolation="nearest")
    axis.set_axis_off()
    mean = float(finite.mean()) if finite.size else float("nan")
    axis.set_title(f"{title}\nmean {mean:.2f} {unit}", fontsize=9)
    figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.04, label=unit)
    return _save_figure(figure, path)


def picture_grid(rows: list[list[np.ndarray]], path, row_labels: list[str] | None = None,
                 column_labels: list[str] | None = None, cell_inches: float = 2.0) -> Path:
    """Pictures side by side: ``rows[r][c]`` is an ``H x W x 3`` uint8 image, labelled by row and column.

    Used for the ablation's PCA pictures (one row per attempt, one column per frame) and the
    demo's propagated masks.
    """
    if not rows or not rows[0]:
        raise ValueError("picture_grid needs at least one picture")
    plt = _pyplot()
    count_rows, count_columns = len(rows), max(len(r) for r in rows)
    height, width = rows[0][0].shape[:2]
    aspect = height / width
    figure, axes = plt.subplots(count_rows, count_columns, squeeze=False,
                                figsize=(cell_inches * count_columns + (1.2 if row_labels else 0.2),
                                         cell_inches * aspect * count_rows + 0.4))
    for r, row in enumerate(rows):
        for c in range(count_columns):
            axis = axes[r][c]
            axis.set_xticks([])
            axis.set_yticks([])
            for spine in axis.spines.values():
                spine.set_visible(False)
            if c < len(row):
                axis.imshow(row[c], interpolation="nearest")
            if r == 0 and column_labels and c < len(column_labels):
                axis.set_title(column_labels[c], fontsize=9)
            if c == 0 and row_labels and r < len(row_labels):
                axis.set_ylabel(row_labels[r], fontsize=9, rotation=0, ha="right", va="center")
    figure.tight_layout(pad=0.3)
    return _save_figure(figure, path)


# --------------------------------------------------------------------------- flows and matches


def flow_to_color(flow, max_flow: float | None = None) -> np.ndarray:
    """The Middlebury colour coding of an ``H x W x 2`` flow, as ``H x W x 3`` uint8 RGB.

    The direction picks the hue on the Middlebury colour wheel (Baker et al., "A
    Database and Evaluation Methodology for Optical Flow", 2011: 55 hues through red,
    yellow, green, cyan, blue and magenta); the length, divided by ``max_flow`` (default:
    the largest length over the known pixels), picks the saturation: zero flow is white, a flow
    of length ``max_flow`` the full hue, longer flows a darkened hue; unknown pixels
    (``known_flow``) are black. Pass the same ``max_flow`` to compare two fields.
    """
    flow = to_numpy_hw2(flow).astype(np.float64)
    u, v = flow[..., 0], flow[..., 1]
    unknown = ~known_flow(flow)
    u, v = np.where(unknown, 0.0, u), np.where(unknown, 0.0, v)
    radius = np.hypot(u, v)
    scale = float(max_flow) if max_flow is not None else float(radius.max(initial=0.0))
    radius = radius / scale if scale > 0 else radius
    wheel = _color_wheel()
    # angle in (-1, 1], 0 pointing left (-u), measured as Middlebury's code does
    position = (np.arctan2(-v, -u) / np.pi + 1) / 2 * (len(wheel) - 1)
    low = np.floor(position).astype(int)
    high = (low + 1) % len(wheel)
    weight = (position - low)[..., None]
    color = (1 - weight) * wheel[low] + weight * wheel[high]
    inside = (radius <= 1)[..., None]
    color = np.where(inside, 1 - radius[..., None] * (1 - color), color * 0.75)
    color[unknown] = 0.0
    return np.floor(255 * color).astype(np.uint8)


def _color_wheel() -> np.ndarray:
    """The 55 Middlebury hues, ``55 x 3`` in [0, 1]: six ramps between the primaries."""
    # (steps, start colour); each ramp moves one channel from the start towards the next start
    ramps = [(15, (1, 0, 0)), (6, (1, 1, 0)), (4, (0, 1, 0)), (11, (0, 1, 1)), (13, (0, 0, 1)), (6, (1, 0, 1))]
    colors = []
    for index, (steps, start) in enumerate(ramps):
        end = np.array(ramps[(index + 1) % len(ramps)][1], dtype=np.float64)
        start = np.array(start, dtype=np.float64)
        fractions = np.arange(steps)[:, None] / steps
        colors.append(start + fractions * (end - start))
    return np.concatenate(colors)


def match_picture(image_a, image_b, match, gt_flow=None):
    """One labelled picture of a match, ``H x W x 3`` uint8 (panels at A's size, 3 per row).

    Panels: A; B; A warped onto B (A's pixels pulled onto B's grid by flow_ba); the flow
    A -> B in Middlebury colours (and the ground truth, when given, on the same colour
    scale); the inverse-consistency error on B's pixels as a heat map (black 0, yellow
    white at the 99th percentile, which the label gives).

    ``image_a``, ``image_b``: ``1 x 3 x H x W`` in [0, 1]; ``match``: a
    ``fmapicon.evaluation.correspond.Match``; ``gt_flow``: ``H x W x 2`` numpy.
    """
    flow_ab = match.flow_ab[0].permute(1, 2, 0).cpu().numpy()
    max_flow = max(max_known_length(gt_flow if gt_flow is not None else flow_ab), 1e-6)
    warped = warp_image(image_a, match.flow_ba.to(image_a))
    error = match.ic_error[0].cpu().numpy()
    top = max(float(np.percentile(error, 99)), 1e-6)
    panels = [("A", _rgb(image_a)), ("B", _rgb(image_b)), ("A warped onto B", _rgb(warped)),
              (f"flow A->B (max {max_flow:.1f} px)", flow_to_color(flow_ab, max_flow))]
    if gt_flow is not None:
        panels.append(("ground-truth flow A->B", flow_to_color(gt_flow, max_flow)))
    panels.append((f"IC error on B (0 to {top:.1f} px)", heat_colors(error, top)))
    return _panel_grid(panels, size=tuple(image_a.shape[-2:]), columns=3)


def _rgb(image):
    """``1 x 3 x H x W`` in [0, 1] -> ``H x W x 3`` uint8."""
    return (image[0].clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).cpu().numpy()


def heat_colors(values, top: float, cmap: str = "inferno") -> np.ndarray:
    """``H x W`` values -> ``H x W x 3`` uint8 in matplotlib's colour map ``cmap``: 0 at its
    first colour, ``top`` and above at its last (NaN as 0)."""
    colormap = require("matplotlib").colormaps[cmap]
    scaled = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64) / top), 0, 1)
    return (colormap(scaled)[..., :3] * 255 + 0.5).astype(np.uint8)


def _panel_grid(panels, size, columns: int):
    """Labelled panels (name, ``h x w x 3`` uint8), each resized to ``size``, on a white grid."""
    from PIL import ImageDraw, ImageFont

    height, width = size
    label, gap = 16, 4
    rows = -(-len(panels) // columns)
    sheet = Image.new("RGB", (columns * (width + gap) + gap, rows * (height + label + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for index, (name, pixels) in enumerate(panels):
        left = gap + (index % columns) * (width + gap)
        top = gap + (index // columns) * (height + label + gap)
        panel = Image.fromarray(np.ascontiguousarray(pixels)).resize((width, height), Image.BILINEAR)
        sheet.paste(panel, (left, top + label))
        draw.text((left + 2, top + 2), name, fill="black", font=font)
    return np.asarray(sheet)
