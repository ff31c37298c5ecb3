"""Phi^AB from feature maps: dense correspondence, its inverse consistency, and pixels.

Two feature maps ``fa: B x C x h x w`` (image A) and ``fb: B x C x h' x w'`` (image B)
define the map Phi^AB: each cell x of A goes to the cell of B whose feature has the
largest dot product with ``fa[x]`` (argmax), or to the expected position under
``softmax_j(fa[x] . fb[j] / temperature)`` (soft-argmax). The training objective asks
for exactly this soft map to be inverse consistent: Phi^AB(Phi^BA(y)) = y.

Conventions (the same as ``fmapicon.data.flow``):

- A map is a displacement field ``B x 2 x h x w`` with channels (u, v) = (x, y):
  Phi^AB(x) = x + phi_ab(x); cell and pixel centres sit at integer coordinates.
- ``correspondence`` gives displacements in feature cells (B's cell index minus A's);
  ``pixel_flow`` turns them into pixels at full resolution, each grid's cell being
  ``H / h`` x ``W / w`` of its own image's pixels.
- The inverse-consistency error lives on B's grid: y in B goes to A by Phi^BA and back
  to B by Phi^AB, and the error is ``|Phi^AB(Phi^BA(y)) - y|``.

Memory stays bounded: the score matrix is computed in tiles of A's cells against all of
B (or, with ``radius``, against the window of B that the tile can reach), never as the
full N x N' matrix.

From images: ``features_at_stride`` (a ``fmapicon.evaluation.features`` model -> unit features on
cells of ``stride`` pixels), ``match_images`` / ``match_features`` (both maps in pixels
and the IC error, a ``Match``).
The picture of a match is ``fmapicon.experiments.figures.match_picture``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fmapicon.errors import UserError
from fmapicon.data.flow import resize_flow, warp_image

# softmax(dot / T) with T = 1 / lambda^2 on unit features reproduces the training logits
# lambda^2 (fa . fb); 12 is NormScale's initial lambda, the fallback for models without one.
DEFAULT_LAMBDA = 12.0
DEFAULT_TEMPERATURE = 1.0 / DEFAULT_LAMBDA**2

# entries of one tile's score matrix per batch element (16 MB in float32)
SCORE_BUDGET = 2**22

# argmax: scores this close (relative) to the best are a tie, settled by the shortest move
TIE_TOLERANCE = 1e-6

# coarse to fine: cells searched around the parent's match at each finer level (a parent
# off by one cell is two cells off below)
REFINE_RADIUS = 2


@dataclass
class Match:
    """Both maps of a pair in pixels, at full resolution, and the inverse-consistency error.

    flow_ab : ``B x 2 x H x W`` on A's grid, B(x + flow_ab(x)) matches A(x).
    flow_ba : ``B x 2 x H' x W'`` on B's grid.
    ic_error : ``B x H' x W'`` pixels, ``|Phi^AB(Phi^BA(y)) - y|`` for each pixel y of B.
    temperature : the soft-argmax temperature used (None for argmax).
    """

    flow_ab: torch.Tensor
    flow_ba: torch.Tensor
    ic_error: torch.Tensor
    temperature: float | None


def correspondence(fa, fb, *, soft: bool = False, temperature: float | None = None,
                   radius: int | None = None, block: int | None = None, levels: int = 0) -> torch.Tensor:
    """The map Phi^AB as a displacement field in feature cells, ``B x 2 x h x w``.

    Parameters
    ----------
    fa, fb : ``B x C x h x w`` and ``B x C x h' x w'`` features (unit-norm or lambda-scaled).
    soft : False: Phi^AB(x) = argmax_j fa[x] . fb[j], ties (equal scores, as in flat
        regions) going to the candidate nearest x's own place. True: the expectation of
        B's cell coordinates under softmax_j(fa[x] . fb[j] / temperature).
    temperature : soft-argmax temperature (default ``DEFAULT_TEMPERATURE`` = 1/144).
    radius : search only the B cells within ``radius`` cells (per axis, a square window)
        of the cell corresponding to x (the same cell when h' = h and w' = w).
    block : at most this many of A's cells per tile (default: a tile's score matrix
        holds about ``SCORE_BUDGET`` entries). Results do not depend on it.
    levels : coarse to fine (``coarse_to_fine``) over this many halvings of both grids:
        the whole image is searched at the coarsest level only, then each finer level
        searches ``radius`` cells (default ``REFINE_RADIUS``) around the match that the
        level above found for the cell's parent. 0 (default): one flat search.

    Returns
    -------
    ``B x 2 x h x w`` float32: (u, v) such that x + (u, v) is x's match in B's cell grid.
    """
    _check_features(fa, fb)
    temperature = _check_options(soft, temperature, radius, block)
    fa, fb = fa.float(), fb.float()
    if levels:
        return coarse_to_fine(fa, fb, levels, radius=radius, temperature=temperature, block=block)
    height, width = fa.shape[-2:]
    positions = fa.new_empty(fa.shape[0], 2, height, width)
    for y0, y1, x0, x1 in _tiles(fa.shape[-2:], fb.shape[-2:], radius, block):
        positions[:, :, y0:y1, x0:x1] = _match_tile(fa, fb, (y0, y1, x0, x1), temperature, radius)
    return positions - _cell_coordinates(height, width, fa.device)


def coarse_to_fine(fa, fb, levels: int, *, radius: int | None = None, temperature: float | None = None,
                   block: int | None = None) -> torch.Tensor:
    """Phi^AB in cells of ``fa``'s grid by a search from coarse to fine (``B x 2 x h x w``).

    Both grids are halved ``levels`` times (2 x 2 average pooling, rounding up, then unit
    length again). At the coarsest level every cell of A searches the whole of B, so that
    large motions are found; at each finer level a cell searches the ``(2 radius + 1)^2``
    cells of B around ``2 p + (x mod 2)``, p being the match of its parent cell x // 2
    one level up (rounded), so only the coarsest search costs O(N N'). ``radius`` defaults
    to ``REFINE_RADIUS``: a parent's match may be off by a cell, two cells below. The
    coarser levels take the argmax (their matches only place the windows below: the mode,
    where a soft mean of two look-alikes would fall between them); the finest level is
    soft when ``temperature`` is given, as ``correspondence``. Argmax ties go to the
    candidate nearest the predicted place.

    Why: with one flat search over the whole image, a cell whose best score lands on a
    far-away look-alike is an outlier of hundreds of pixels (``docs/experiments.md``);
    pooled features of the coarse levels describe larger regions, which repeat less.
    """
    if levels < 0:
        raise ValueError(f"levels must be >= 0, got {levels}")
    radius = REFINE_RADIUS if radius is None else radius
    pyramid_a, pyramid_b = [fa.float()], [fb.float()]
    for _ in range(levels):
        pyramid_a.append(_halve(pyramid_a[-1]))
        pyramid_b.append(_halve(pyramid_b[-1]))
    coarse_a, coarse_b = pyramid_a[-1], pyramid_b[-1]
    positions = correspondence(coarse_a, coarse_b, block=block) + _cell_coordinates(*coarse_a.shape[-2:], fa.device)
    for depth in reversed(range(levels)):
        level_a, level_b = pyramid_a[depth], pyramid_b[depth]
        centres = _child_centres(positions, level_a.shape[-2:], level_b.shape[-2:])
        positions = _guided_match(level_a, level_b, centres, radius, temperature if depth == 0 else None, block)
    return positions - _cell_coordinates(*fa.shape[-2:], fa.device)


def _halve(features):
    """One pyramid level up: 2 x 2 mean (a last odd row or column alone), unit length again."""
    return F.normalize(F.avg_pool2d(features, 2, ceil_mode=True), dim=1)


def _child_centres(parent_positions, cells_a, cells_b):
    """Integer centres (x, y) on B's finer grid for A's finer cells: ``2 p + (x mod 2)``,
    p the matched position of the parent cell x // 2, clamped to B's grid."""
    ys = torch.arange(cells_a[0], device=parent_positions.device)
    xs = torch.arange(cells_a[1], device=parent_positions.device)
    parents = parent_positions[:, :, ys // 2][:, :, :, xs // 2]
    offsets = torch.stack(torch.meshgrid(xs % 2, ys % 2, indexing="xy")).to(parents.dtype)
    centres = torch.round(2 * parents + offsets)
    limits = torch.tensor([cells_b[1] - 1, cells_b[0] - 1], device=centres.device).view(1, 2, 1, 1)
    return torch.minimum(centres.clamp_min(0), limits)


def _guided_match(fa, fb, centres, radius: int, temperature, block):
    """Matched positions (B's cells, ``B x 2 x h x w``) when each cell x of A searches the
    ``(2 radius + 1)^2`` cells of B around its own ``centres[x]`` (integer (x, y)); cells
    outside B are not candidates. Rows of A in chunks whose gathered keys (cells x
    candidates x channels) stay within ``SCORE_BUDGET`` entries per batch element (or of
    ``block`` cells), a whole row at least."""
    batch, channels, height, width = fa.shape
    rows_b, cols_b = fb.shape[-2:]
    steps = torch.arange(-radius, radius + 1, device=fa.device)
    step_y, step_x = (t.reshape(-1) for t in torch.meshgrid(steps, steps, indexing="ij"))
    distance = (step_y**2 + step_x**2).float()
    candidates = len(step_y)
    keys_b = fb.flatten(2)
    rows = max(1, (block or SCORE_BUDGET // (candidates * channels)) // width)
    positions = fa.new_empty(batch, 2, height, width)
    for y0 in range(0, height, rows):
        y1 = min(height, y0 + rows)
        key_x = centres[:, 0, y0:y1, :, None].long() + step_x  # B x r x w x K
        key_y = centres[:, 1, y0:y1, :, None].long() + step_y
        inside = (key_x >= 0) & (key_x < cols_b) & (key_y >= 0) & (key_y < rows_b)
        index = (key_y.clamp(0, rows_b - 1) * cols_b + key_x.clamp(0, cols_b - 1)).flatten(1)
        keys = keys_b.gather(2, index[:, None].expand(-1, channels, -1)).view(batch, channels, y1 - y0, width, -1)
        scores = (fa[:, :, y0:y1, :, None] * keys).sum(1).masked_fill(~inside, float("-inf"))
        if temperature is None:
            tied = _tied_with_best(scores, scores.max(dim=-1).values)
            pick = distance.expand_as(scores).masked_fill(~tied, float("inf")).argmin(dim=-1, keepdim=True)
            match_x, match_y = key_x.gather(-1, pick)[..., 0].float(), key_y.gather(-1, pick)[..., 0].float()
        else:
            weights = torch.softmax(scores / temperature, dim=-1)
            match_x, match_y = (weights * key_x).sum(-1), (weights * key_y).sum(-1)
        positions[:, 0, y0:y1], positions[:, 1, y0:y1] = match_x, match_y
    return positions


def compose(inner, outer, *, mode: str = "bilinear") -> torch.Tensor:
    """The displacement of ``outer o inner`` on inner's grid: inner(x) + outer(x + inner(x)).

    ``inner``: ``B x 2 x H x W`` from grid 1 to grid 2; ``outer``: ``B x 2 x H2 x W2`` on
    grid 2. ``outer`` is sampled at x + inner(x) (``mode`` bilinear or nearest); points
    that leave grid 2 read its nearest edge value.
    """
    return inner + warp_image(outer, inner.to(outer.dtype), mode=mode, padding="border")


def inverse_consistency_error(phi_ab, phi_ba, *, mode: str = "bilinear") -> torch.Tensor:
    """``|Phi^AB(Phi^BA(y)) - y|`` for each y of B's grid, ``B x H' x W'``.

    ``phi_ab``: ``B x 2 x H x W`` on A's grid, in A-to-B units; ``phi_ba``: ``B x 2 x H' x W'``
    on B's grid. Each y of B goes to y + phi_ba(y) in A, where phi_ab is sampled
    (bilinear, or nearest), and comes back to B. The error is in the units of the
    displacements (cells or pixels); zero for a pair of mutually inverse maps.
    """
    return compose(phi_ba, phi_ab, mode=mode).norm(dim=1)


def pixel_flow(phi, size_a, size_b=None, cells_b=None) -> torch.Tensor:
    """Turn a cell displacement ``B x 2 x h x w`` into pixels at A's full resolution.

    Parameters
    ----------
    phi : the output of ``correspondence`` (cells of B minus cells of A).
    size_a, size_b : ``(H, W)`` of images A and B in pixels (B defaults to A's).
    cells_b : ``(h', w')`` of B's feature grid (defaults to phi's grid).

    Returns
    -------
    ``B x 2 x H x W``: each cell's match converted to pixels of B minus the cell's centre
    in pixels of A, bilinearly upsampled (align_corners=False) to A's pixels. With equal
    cell sizes this is ``resize_flow(phi, size_a)``.
    """
    height, width = phi.shape[-2:]
    size_b = size_a if size_b is None else size_b
    cells_b = (height, width) if cells_b is None else cells_b
    scale_a = torch.tensor([size_a[1] / width, size_a[0] / height], device=phi.device).view(1, 2, 1, 1)
    scale_b = torch.tensor([size_b[1] / cells_b[1], size_b[0] / cells_b[0]], device=phi.device).view(1, 2, 1, 1)
    cells = _cell_coordinates(height, width, phi.device)
    match_pixels = (cells + phi + 0.5) * scale_b - 0.5
    source_pixels = (cells + 0.5) * scale_a - 0.5
    # in units of A's cells, so that resize_flow's rescaling gives pixels
    return resize_flow((match_pixels - source_pixels) / scale_a, size_a)


def features_at_stride(model, images, stride: int = 4, input_scale: float | None = None) -> torch.Tensor:
    """Unit features on cells of ``stride`` pixels of the full-resolution images.

    Parameters
    ----------
    model : a ``fmapicon.evaluation.features.load_model`` result: images ``B x 3 x H x W`` in [0, 1]
        -> features ``B x C x ceil(H / s) x ceil(W / s)`` for its ``stride`` s (the last
        cells may cover edge padding); ``default_input_scale`` is used when
        ``input_scale`` is None.
    images : ``B x 3 x H x W`` float in [0, 1], RGB, on the model's device.
    stride : cell size in pixels of ``images``; the grid is round(H / stride) x
        round(W / stride) (at least 1 x 1).
    input_scale : the network sees the images resized by this factor.

    Returns
    -------
    ``fmapicon.evaluation.features.extract(model, images, scale=input_scale, stride=stride)``:
    ``B x C x h x w`` float32, L2-normalized per cell, cells that tile the image exactly.
    """
    from fmapicon.evaluation.features import extract

    if stride < 1:
        raise ValueError(f"stride must be a positive number of pixels, got {stride}")
    scale = float(getattr(model, "default_input_scale", 1.0) if input_scale is None else input_scale)
    return extract(model, images, scale=scale, stride=stride)


def default_temperature(model) -> float:
    """1 / lambda^2 of the model's trained NormScale, else ``DEFAULT_TEMPERATURE`` (1/144)."""
    scale = _model_lambda(model)
    return DEFAULT_TEMPERATURE if scale is None else 1.0 / scale**2


def match_images(model, image_a, image_b, *, stride: int = 4, soft: bool = False,
                 temperature: float | None = None, radius: int | None = None,
                 input_scale: float | None = None, block: int | None = None, levels: int = 0) -> Match:
    """Phi^AB and Phi^BA of two images in pixels at full resolution, and the IC error.

    ``image_a``: ``B x 3 x H x W``, ``image_b``: ``B x 3 x H' x W'``, float in [0, 1],
    on the model's device. Features are computed on cells of ``stride`` pixels (see
    ``features_at_stride``) and matched by ``match_features``; the soft-argmax
    temperature defaults to ``default_temperature(model)`` (1/lambda^2).
    """
    if soft and temperature is None:
        temperature = default_temperature(model)
    fa = features_at_stride(model, image_a, stride, input_scale)
    fb = features_at_stride(model, image_b, stride, input_scale)
    return match_features(fa, fb, tuple(image_a.shape[-2:]), tuple(image_b.shape[-2:]), soft=soft,
                          temperature=temperature, radius=radius, block=block, levels=levels)


def match_features(fa, fb, size_a, size_b, *, soft: bool = False, temperature: float | None = None,
                   radius: int | None = None, block: int | None = None, levels: int = 0) -> Match:
    """Both maps from feature grids ``fa``, ``fb`` of images of ``size_a``, ``size_b`` pixels.

    ``correspondence`` both ways (``levels`` > 0: coarse to fine), ``pixel_flow`` to full
    resolution, and the inverse-consistency error computed from these full-resolution
    maps on B's pixels.
    """
    options = dict(soft=soft, temperature=temperature, radius=radius, block=block, levels=levels)
    flow_ab = pixel_flow(correspondence(fa, fb, **options), size_a, size_b, fb.shape[-2:])
    flow_ba = pixel_flow(correspondence(fb, fa, **options), size_b, size_a, fa.shape[-2:])
    used = (DEFAULT_TEMPERATURE if temperature is None else float(temperature)) if soft else None
    return Match(flow_ab, flow_ba, inverse_consistency_error(flow_ab, flow_ba), used)


def load_feature_model(spec, device="cpu", stride: int = 4):
    """``fmapicon.evaluation.features.load_model(spec, device)``; the ``pixels`` baseline averages its
    Lab colour over cells of ``stride`` pixels, the cells being matched."""
    from fmapicon.evaluation.features import load_model

    return load_model(spec, device, stride=stride) if str(spec) == "pixels" else load_model(spec, device)


# --- tiles -------------------------------------------------------------------------------


def _tiles(size_a, size_b, radius, block):
    """``(y0, y1, x0, x1)`` tiles of A's cell grid: row bands (global search) or squares (radius)."""
    height, width = size_a
    if radius is None:
        cells = block or max(1, SCORE_BUDGET // (size_b[0] * size_b[1]))
        rows, cols = (cells // width, width) if cells >= width else (1, cells)
    else:
        side = math.isqrt(block) if block else _square_tile_side(radius)
        rows = cols = max(1, side)
    for y0 in range(0, height, rows):
        for x0 in range(0, width, cols):
            yield y0, min(y0 + rows, height), x0, min(x0 + cols, width)


def _square_tile_side(radius: int) -> int:
    """The side t of a square tile whose t^2 x (t + 2r + 1)^2 score matrix fits the budget."""
    reach = 2 * radius + 1
    root = math.sqrt(SCORE_BUDGET)  # t (t + reach) <= sqrt(budget)
    return max(1, int((-reach + math.sqrt(reach * reach + 4 * root)) / 2))


def _match_tile(fa, fb, tile, temperature, radius):
    """Matched positions (B's cells) of one tile of A: ``B x 2 x rows x cols``."""
    y0, y1, x0, x1 = tile
    queries = fa[:, :, y0:y1, x0:x1].flatten(2).transpose(1, 2)  # B x n x C
    centre_y = _centres(y0, y1, fa.shape[-2], fb.shape[-2], fa.device)
    centre_x = _centres(x0, x1, fa.shape[-1], fb.shape[-1], fa.device)
    wy0, wy1 = _window(centre_y, fb.shape[-2], radius)
    wx0, wx1 = _window(centre_x, fb.shape[-1], radius)
    keys = fb[:, :, wy0:wy1, wx0:wx1].flatten(2)  # B x C x m
    scores = queries @ keys  # B x n x m
    key_y = torch.arange(wy0, wy1, device=fa.device, dtype=torch.float32)
    key_x = torch.arange(wx0, wx1, device=fa.device, dtype=torch.float32)
    if radius is not None:
        _mask_window(scores, centre_y, centre_x, key_y, key_x, radius)
    key_y = key_y[:, None].expand(-1, len(key_x)).reshape(-1)
    key_x = key_x[None, :].expand(wy1 - wy0, -1).reshape(-1)
    if temperature is None:
        best = _argmax_nearest(scores, centre_y, centre_x, key_y, key_x)
        match_x, match_y = key_x[best], key_y[best]
    else:
        weights = torch.softmax(scores / temperature, dim=-1)
        match_x, match_y = weights @ key_x, weights @ key_y
    return torch.stack([match_x, match_y], dim=1).view(fa.shape[0], 2, y1 - y0, x1 - x0)


def _argmax_nearest(scores, centre_y, centre_x, key_y, key_x):
    """The best key of each query, ties going to the key nearest the query's own place.

    Flat or saturated regions give many equal scores; torch's argmax would take the
    first (top-left) one, a systematic pull up and to the left. Scores within
    ``TIE_TOLERANCE`` (relative) of the best count as equal. Only rows with a tie pay.
    """
    best_score, best = scores.max(dim=-1)
    tied = _tied_with_best(scores, best_score)
    rows = (tied.sum(dim=-1) > 1).nonzero(as_tuple=True)
    if len(rows[0]) == 0:
        return best
    queries = rows[1]
    width = len(centre_x)
    distance = (key_y[None] - centre_y.repeat_interleave(width)[queries, None]) ** 2 \
        + (key_x[None] - centre_x.repeat(len(centre_y))[queries, None]) ** 2
    best[rows] = distance.masked_fill(~tied[rows], float("inf")).argmin(dim=-1)
    return best


def _tied_with_best(scores, best_score):
    """Which scores (last dimension) are within ``TIE_TOLERANCE`` (relative) of their row's best."""
    return scores >= (best_score - TIE_TOLERANCE * best_score.abs().clamp_min(1.0))[..., None]


def _mask_window(scores, centre_y, centre_x, key_y, key_x, radius) -> None:
    """Set to -inf, in place, the scores of keys outside each query's square window.

    The window is separable (rows x columns), so two small 0/-inf tables broadcast over
    the ``B x (rows x cols) x (window rows x window cols)`` scores do it in two passes.
    """
    def table(centres, keys):
        return torch.zeros(len(centres), len(keys), device=keys.device).masked_fill(
            (keys[None] - centres[:, None]).abs() > radius, float("-inf"))

    batch = scores.shape[0]
    grid = scores.view(batch, len(centre_y), len(centre_x), len(key_y), len(key_x))
    grid.add_(table(centre_y, key_y)[None, :, None, :, None])
    grid.add_(table(centre_x, key_x)[None, None, :, None, :])


def _centres(start: int, stop: int, size_a: int, size_b: int, device) -> torch.Tensor:
    """For A's cells start..stop-1 along one axis, the nearest B cell at the same relative place."""
    cells = torch.arange(start, stop, device=device, dtype=torch.float32)
    return torch.round((cells + 0.5) * size_b / size_a - 0.5).clamp(0, size_b - 1)


def _window(centres, size_b: int, radius):
    """The range of B's cells along one axis that any of ``centres`` may reach."""
    if radius is None:
        return 0, size_b
    return max(0, int(centres.min()) - radius), min(size_b, int(centres.max()) + radius + 1)


def _cell_coordinates(height: int, width: int, device) -> torch.Tensor:
    """Cell coordinates ``1 x 2 x h x w``: channel 0 is x (column), channel 1 is y (row)."""
    ys = torch.arange(height, device=device, dtype=torch.float32)
    xs = torch.arange(width, device=device, dtype=torch.float32)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y])[None]


# --- checks and helpers ------------------------------------------------------------------


def _check_features(fa, fb) -> None:
    if fa.ndim != 4 or fb.ndim != 4:
        raise ValueError(f"feature maps must be B x C x h x w, got {tuple(fa.shape)} and {tuple(fb.shape)}")
    if fa.shape[:2] != fb.shape[:2]:
        raise ValueError(f"feature maps differ in batch or channels: {tuple(fa.shape)} vs {tuple(fb.shape)}")


def _check_options(soft, temperature, radius, block):
    """The temperature to use (None for argmax), after checking the options."""
    if radius is not None and radius < 0:
        raise ValueError(f"radius must be >= 0 feature cells, got {radius}")
    if block is not None and block < 1:
        raise ValueError(f"block must be >= 1 cell, got {block}")
    if not soft:
        return None
    temperature = DEFAULT_TEMPERATURE if temperature is None else float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return temperature


def _model_lambda(model, depth: int = 4) -> float | None:
    """The trained lambda (NormScale) of a model or of the networks it wraps (``.net``,
    ``.network``, a few levels down), if any."""
    if model is None or depth == 0:
        return None
    value = getattr(model, "lambda_", None)
    if value is not None:
        return float(value)
    for attribute in ("net", "network"):
        value = _model_lambda(getattr(model, attribute, None), depth - 1)
        if value is not None:
            return value
    return None
