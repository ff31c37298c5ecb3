"""Reports: pictures of what training and the features do, and one HTML page that ties them together.

Everything here turns numbers that other modules computed into files a person looks at:

- training curves from a run's ``metrics.jsonl``: the loss, and ``log_p`` against
  ``log_p_shuffled`` (equal curves mean a positional code, attempt 0 of the writeup);
- PCA-colour pictures of feature maps: the top three principal components of the
  ``C``-dimensional features, one per colour channel, the way the writeup shows features;
- propagated masks as a translucent overlay in the DAVIS palette;
- heat maps (the inverse-consistency error |Phi^AB(Phi^BA(x)) - x|);
- HTML tables and ``write_html``, a single self-contained page (pictures embedded as
  base64 ``data:`` URIs, so the page can be mailed or pasted as one file).

matplotlib is optional (``pip install 'fmapicon[plots]'``) and is imported lazily with the
Agg backend; arrays are numpy (torch tensors are accepted and moved to the CPU).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

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


# --------------------------------------------------------------------------- HTML


def _cell(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def html_table(rows: list[dict], columns: list[str] | None = None, headers: dict | None = None,
               digits: int = 3, best: dict | None = None, caption: str | None = None) -> str:
    """An HTML table of ``rows`` (dicts); None or NaN shows as a dash.

    ``best`` maps a column to ``"max"`` or ``"min"``: its best value is set in bold, so a
    reader sees at a glance which model wins each figure.
    """
    if not rows:
        return "<p><em>(no rows)</em></p>"
    columns = columns or list(rows[0])
    headers = headers or {}
    winners = {column: _best_value(rows, column, rule) for column, rule in (best or {}).items()}
    parts = ["<table>"]
    if caption:
        parts.append(f"<caption>{html.escape(caption)}</caption>")
    parts.append("<thead><tr>" + "".join(f"<th>{html.escape(headers.get(c, c))}</th>" for c in columns)
                 + "</tr></thead><tbody>")
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            text = _cell(value, digits)
            bold = winners.get(column) is not None and isinstance(value, float) and value == winners[column]
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            cls = ' class="num"' if numeric or value is None else ""
            cells.append(f"<td{cls}>{'<b>' + text + '</b>' if bold else text}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</tbody></table>")
    return "\n".join(parts)


def _best_value(rows, column, rule):
    values = [r.get(column) for r in rows
              if isinstance(r.get(column), float) and math.isfinite(r.get(column))]
    if not values:
        return None
    return max(values) if rule == "max" else min(values)


@dataclass
class Section:
    """One part of a report page.

    Attributes
    ----------
    title : the heading.
    text : a paragraph of plain text (escaped), shown under the heading.
    html : trusted HTML inserted as is (e.g. from ``html_table``).
    images : PNG files to show, each with a caption: a list of ``(path, caption)``.
    """

    title: str
    text: str = ""
    html: str = ""
    images: list = field(default_factory=list)


_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1.5em; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; border-bottom: 2px solid #444; padding-bottom: .3em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ccc; padding-bottom: .2em; }
p.meta { color: #555; font-size: .9em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .95em; }
caption { caption-side: bottom; font-size: .85em; color: #555; padding-top: .4em; text-align: left; }
th, td { border: 1px solid #ccc; padding: .35em .8em; }
th { background: #f1f1f1; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { display: inline-block; margin: .6em 1em .6em 0; vertical-align: top; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; image-rendering: auto; }
figcaption { font-size: .85em; color: #444; max-width: 1050px; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: .85em; }
"""


def _data_uri(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    mime = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "svg": "image/svg+xml",
            "gif": "image/gif"}.get(suffix)
    if mime is None:
        raise ValueError(f"cannot embed {path}: expected a .png, .jpg, .svg or .gif picture")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def machine_line(machine: dict, seconds: float | None = None) -> str:
    """The page's meta line: version, date, machine (``fmapicon.bench.machine_info()``) and,
    when given, how long the whole job took."""
    from fmapicon import __version__

    line = (f"fmapicon {__version__} · {machine.get('date')} · {machine.get('processor')} with "
            f"{machine.get('cpu_count')} CPUs, {machine.get('torch_threads')} torch threads"
            + (f", {machine['cuda']}" if machine.get("cuda") else ""))
    return line + (f" · {seconds / 60:.1f} min in all" if seconds is not None else "")


def write_html(path, title: str, sections: list[Section], meta: str = "") -> Path:
    """Write one self-contained HTML page: every picture is embedded as a base64 ``data:`` URI.

    A missing picture is an error (a page with a broken image is worse than none).
    Returns the path written (atomically).
    """
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if meta:
        parts.append(f'<p class="meta">{html.escape(meta)}</p>')
    for section in sections:
        parts.append(_section_html(section))
    parts.append("</body></html>")
    path = Path(path)
    with atomic_write(path, "w") as handle:
        handle.write("\n".join(parts) + "\n")
    return path


def _section_html(section: Section) -> str:
    parts = [f"<h2>{html.escape(section.title)}</h2>"]
    if section.text:
        parts += [f"<p>{html.escape(paragraph)}</p>" for paragraph in section.text.split("\n\n")]
    if section.html:
        parts.append(section.html)
    for image, caption in section.images:
        image = Path(image)
        if not image.is_file():
            raise FileNotFoundError(f"the report refers to a picture that does not exist: {image}")
        alt = html.escape(caption or image.name)
        parts.append(f'<figure><img src="{_data_uri(image)}" alt="{alt}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return "\n".join(parts)
