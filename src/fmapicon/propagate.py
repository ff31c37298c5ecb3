"""Label propagation through a video: the protocol of CRW (ajabri/videowalk), and DAVIS evaluation.

CRW protocol (``protocol="crw"``), every value a field of ``PropagationParams``:

1. Features. The network sees each frame resized by ``input_scale``; its features are
   resampled (bilinearly, anti-aliased when shrinking) to cells of ``stride`` pixels of the
   full-size frame, ``h x w = ceil(H / stride) x ceil(W / stride)``, and L2-normalized.
2. Labels. The first frame's ids 0..K (void 255 counts as background) become one-hot maps,
   bilinearly down-sampled to ``h x w`` (align_corners=False, no anti-aliasing: OpenCV's
   INTER_LINEAR, as CRW).
3. Context of frame t >= 1: the first frame (the long-term memory, with its true labels)
   plus the ``context`` frames t-n .. t-1 with their soft predicted labels, where indices
   below 0 repeat the first frame (CRW pads the video with n copies of it, true labels and
   all, so the early frames see duplicates).
4. Affinity of a query cell q of frame t with a key cell k of a context frame:
   ``<f_q, f_k> / temperature``. Keys of the short-term frames count only within
   ``|q - k| < radius`` feature cells (Euclidean, on the grid); the first frame's keys count
   everywhere (CRW leaves its long-term memory unrestricted; ``restrict_first=True`` applies
   the radius there too). The ``topk`` largest affinities over all context keys together
   are kept and softmax-normalized; the query's soft label is their weighted sum of the
   keys' soft labels. It becomes frame t's context label for later frames.
5. Output: the soft labels bilinearly up-sampled to H x W (align_corners=False), argmax.

Memory stays bounded: query cells are processed in tiles of ``tile x tile``; each tile
meets only the ``(tile + 2m)^2`` key cells (m = ceil(radius) - 1) around it in each
short-term frame, masked to the radius, never a whole frame pair. Only the unrestricted
first frame is scored against all of its cells, one band of tiles at a time.

``protocol="original"`` is the original FeatureMapICON code's evaluation: the centre square
of each frame subsampled by 4 (``[::4]``), a hard nearest neighbour (argmax of the dot
product, unit features here) in the first frame only, the first mask's label at the matched
cell (sampled at pixel offset 2), repeated 4 x 4; outside the centre square the first mask
is kept. ``protocol="copy"`` repeats the first mask.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fmapicon.errors import UserError

PROTOCOLS = ("crw", "original", "copy")
VOID = 255


@dataclass
class PropagationParams:
    """The protocol's values (defaults: CRW's DAVIS settings).

    protocol : ``crw``, ``original`` or ``copy``
    input_scale : the frame scale the network sees; None means the model's default
        (the scale a checkpoint was trained at, 1.0 for the baselines)
    stride : feature cell size in full-size pixels
    context : number of previous frames in the context (besides the first frame)
    radius : spatial radius of the short-term affinities, in feature cells (strict <)
    topk : affinities kept per query, over all context keys
    temperature : softmax temperature on the cosine affinities
    restrict_first : apply the radius to the first frame's keys too (CRW does not)
    tile : query tile side in cells (memory and speed only, never the result)
    batch_size : frames per batch in feature extraction
    """

    protocol: str = "crw"
    input_scale: float | None = None
    stride: int = 8
    context: int = 20
    radius: float = 12.0
    topk: int = 10
    temperature: float = 0.05
    restrict_first: bool = False
    tile: int = 8
    batch_size: int = 4

    def checked(self) -> PropagationParams:
        problems = []
        if self.protocol not in PROTOCOLS:
            problems.append(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.input_scale is not None and not (0 < self.input_scale <= 8):
            problems.append(f"input_scale must be in (0, 8], got {self.input_scale}")
        for name in ("stride", "context", "topk", "tile", "batch_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.radius > 0:
            problems.append(f"radius must be > 0 feature cells, got {self.radius}")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if problems:
            raise UserError("bad propagation parameters: " + "; ".join(problems))
        return self


# --------------------------------------------------------------------------- features and labels


def _to_images(frames: np.ndarray, device) -> torch.Tensor:
    """uint8 ``T x H x W x 3`` -> float ``T x 3 x H x W`` in [0, 1] on ``device``."""
    tensor = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    return tensor.permute(0, 3, 1, 2).float() / 255.0


def _resample(maps: torch.Tensor, size) -> torch.Tensor:
    """Bilinear (align_corners=False) resampling of ``B x C x h x w`` to ``size``;
    anti-aliased when shrinking, the identity when the size already matches."""
    size = tuple(int(s) for s in size)
    if tuple(maps.shape[-2:]) == size:
        return maps
    shrink = size[0] < maps.shape[-2] or size[1] < maps.shape[-1]
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def cell_grid(height: int, width: int, stride: int) -> tuple[int, int]:
    """``(ceil(H / stride), ceil(W / stride))``: the feature cells over a frame."""
    return math.ceil(height / stride), math.ceil(width / stride)


def sequence_features(model, frames: np.ndarray, input_scale: float, stride: int, batch_size: int = 4,
                      on_batch=None) -> torch.Tensor:
    """Unit features of a sequence on the stride grid: ``T x C x h x w`` (model's device).

    Each batch of frames (uint8 ``T x H x W x 3``) is resized by ``input_scale`` (bilinear,
    anti-aliased when shrinking), passed through ``model`` (a FeatureModel), resampled to
    ``cell_grid(H, W, stride)`` and L2-normalized. ``on_batch(n)`` is called after each batch.
    """
    height, width = frames.shape[1:3]
    scaled = (max(1, round(height * input_scale)), max(1, round(width * input_scale)))
    grid = cell_grid(height, width, stride)
    out = []
    for start in range(0, len(frames), batch_size):
        images = _resample(_to_images(frames[start:start + batch_size], model.device), scaled)
        out.append(F.normalize(_resample(model(images), grid), dim=1))
        if on_batch is not None:
            on_batch(len(images))
    return torch.cat(out)


def soft_labels(ids: np.ndarray, grid, device="cpu") -> torch.Tensor:
    """One-hot of ids 0..K (void 255 -> 0), bilinearly down-sampled to ``grid``:
    ``(K+1) x h x w``."""
    ids = torch.from_numpy(np.where(ids == VOID, 0, ids).astype(np.int64)).to(device)
    onehot = F.one_hot(ids, int(ids.max()) + 1).permute(2, 0, 1)[None].float()
    return F.interpolate(onehot, size=tuple(grid), mode="bilinear", align_corners=False)[0]


def labels_to_ids(labels: torch.Tensor, size) -> np.ndarray:
    """Soft labels ``(K+1) x h x w`` -> ``H x W`` uint8 ids: bilinear up-sampling, argmax."""
    full = F.interpolate(labels[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return full.argmax(dim=0).to(torch.uint8).cpu().numpy()


# --------------------------------------------------------------------------- CRW affinities


def context_slots(t: int, context: int) -> list[int]:
    """The short-term context frames of frame t: t-n .. t-1, below 0 repeating frame 0."""
    return [max(0, t - context + j) for j in range(context)]


def _radius_offsets(radius: float, size: tuple[int, int]) -> int:
    """m: the largest offset along one axis with |d| < radius, capped by the grid."""
    return max(0, min(math.ceil(radius) - 1, max(size) - 1))


class _Geometry:
    """Index bookkeeping of the tiled local affinities for one ``h x w`` grid.

    Query cells are grouped in ``tile x tile`` tiles (the grid padded to whole tiles); key
    maps are padded by m on every side, so the key region of the tile at (y, x) is the
    padded window ``[y, y + tile + 2m) x [x, x + tile + 2m)``, R = (tile + 2m)^2 cells.
    """

    def __init__(self, grid, radius: float, tile: int, device):
        self.h, self.w = grid
        self.tile, self.m = tile, _radius_offsets(radius, grid)
        self.rows, self.cols = -(-self.h // tile), -(-self.w // tile)
        self.side = tile + 2 * self.m
        self.padded = (self.rows * tile + 2 * self.m, self.cols * tile + 2 * self.m)
        window = torch.arange(self.side, device=device)
        query = torch.arange(tile, device=device)
        dy = window[None, :, None, None] - self.m - query[:, None, None, None]
        dx = window[None, None, None, :] - self.m - query[None, None, :, None]
        # within[q, r]: key r of the window within the radius of query q (both row-major)
        self.within = ((dy**2 + dx**2) < radius**2).permute(0, 2, 1, 3).reshape(tile * tile, -1)
        self.window_y = window.repeat_interleave(self.side)
        self.window_x = window.repeat(self.side)

    def pad(self, maps: torch.Tensor) -> torch.Tensor:
        """``N x C x h x w`` -> ``N x C x padded``, zeros around (masked anyway)."""
        bottom = self.padded[0] - self.h - self.m
        right = self.padded[1] - self.w - self.m
        return F.pad(maps, (self.m, right, self.m, bottom))

    def pad_queries(self, features: torch.Tensor) -> torch.Tensor:
        """``C x h x w`` -> ``C x (rows tile) x (cols tile)``, zeros in the extra cells."""
        return F.pad(features, (0, self.cols * self.tile - self.w, 0, self.rows * self.tile - self.h))

    def queries(self, padded_queries: torch.Tensor, row: int) -> torch.Tensor:
        """The band of query tiles of tile row ``row``: ``cols x tile^2 x C``."""
        tile = self.tile
        band = padded_queries[:, row * tile:(row + 1) * tile]                 # C x tile x W'
        band = band.reshape(band.shape[0], tile, self.cols, tile)
        return band.permute(2, 1, 3, 0).reshape(self.cols, tile * tile, -1)

    def windows(self, padded: torch.Tensor, slots: list[int], row: int) -> torch.Tensor:
        """Key windows of the band for the context frames ``slots`` of ``padded``
        (``T x C x padded``): ``cols x C x (N R)``, index ``slot * R + r``."""
        strip = padded[:, :, row * self.tile: row * self.tile + self.side][slots]
        strip = strip.unfold(3, self.side, self.tile)                   # N x C x side x cols x side
        return strip.permute(3, 1, 0, 2, 4).reshape(self.cols, padded.shape[1], -1)

    def inside(self, row: int) -> torch.Tensor:
        """``cols x R``: window cells that lie on the frame (not in the padding)."""
        y = self.window_y + row * self.tile - self.m
        x = self.window_x[None] + torch.arange(self.cols, device=y.device)[:, None] * self.tile - self.m
        return ((y >= 0) & (y < self.h))[None] & (x >= 0) & (x < self.w)

    def window_index(self, row: int) -> torch.Tensor:
        """``cols x R``: flat index of each window cell in a padded map."""
        y = self.window_y + row * self.tile
        x = self.window_x[None] + torch.arange(self.cols, device=y.device)[:, None] * self.tile
        return y[None] * self.padded[1] + x

    def scatter(self, out: torch.Tensor, values: torch.Tensor, row: int) -> None:
        """Write ``cols x tile^2 x K`` band results into ``out`` (``K x h x w``)."""
        tile = self.tile
        block = values.reshape(self.cols, tile, tile, -1).permute(3, 1, 0, 2).reshape(values.shape[-1], tile, -1)
        rows = min(tile, self.h - row * tile)
        out[:, row * tile: row * tile + rows] = block[:, :rows, : self.w]


def _local_topk(queries, keys, valid, topk):
    """Top-k over the short-term keys of a band: queries ``cols x Q x C``, keys
    ``cols x C x (N R)``, valid ``cols x Q x R`` -> values and indices ``cols x Q x k``."""
    cols, count, _ = queries.shape
    scores = torch.bmm(queries, keys).view(cols, count, -1, valid.shape[-1])
    scores.masked_fill_(~valid[:, :, None, :], -math.inf)
    return scores.view(cols, count, -1).topk(min(topk, keys.shape[-1]), dim=-1)


def _propagate_frame(query_features, first, short, geometry: _Geometry, params: PropagationParams):
    """Soft labels ``(K+1) x h x w`` of one frame.

    query_features : ``C x h x w``
    first : (features ``C x h x w`` or None when restricted, labels ``(K+1) x h x w``) of frame 0
    short : (padded features of all frames ``T x C x padded``, the context slots (frame
        indices), their padded labels ``N x (K+1) x padded``)
    """
    first_features, first_labels = first
    all_features, slots, slot_labels = short
    classes = first_labels.shape[0]
    out = torch.empty(classes, geometry.h, geometry.w, device=first_labels.device)
    first_keys = None if first_features is None else first_features.reshape(first_features.shape[0], -1)
    first_flat = first_labels.reshape(classes, -1).t()
    slot_flat = slot_labels.permute(0, 2, 3, 1).reshape(-1, classes)
    plane = geometry.padded[0] * geometry.padded[1]
    size = geometry.side**2
    padded_queries = geometry.pad_queries(query_features)
    for row in range(geometry.rows):
        queries = geometry.queries(padded_queries, row)                          # cols x Q x C
        valid = geometry.within[None] & geometry.inside(row)[:, None, :]        # cols x Q x R
        keys = geometry.windows(all_features, slots, row)
        values, index = _local_topk(queries, keys, valid, params.topk)
        window_index = geometry.window_index(row)[:, None, :].expand(-1, index.shape[1], -1)
        flat = (index // size) * plane + torch.gather(window_index, 2, index % size)
        labels = slot_flat[flat]                                                 # cols x Q x k x (K+1)
        if first_keys is not None:
            first_values, first_index = (queries @ first_keys).topk(min(params.topk, first_keys.shape[1]), dim=-1)
            values = torch.cat([values, first_values], dim=-1)
            labels = torch.cat([labels, first_flat[first_index]], dim=-2)
            values, pick = values.topk(min(params.topk, values.shape[-1]), dim=-1)
            labels = torch.gather(labels, 2, pick[..., None].expand(-1, -1, -1, classes))
        weights = torch.softmax(values / params.temperature, dim=-1)
        geometry.scatter(out, (weights[..., None] * labels).sum(dim=2), row)
    return out


def propagate_labels(features: torch.Tensor, first_labels: torch.Tensor, params: PropagationParams,
                     on_frame=None):
    """CRW label propagation on feature maps; yields the soft labels of every frame.

    Parameters
    ----------
    features : ``T x C x h x w`` unit features of the whole sequence
    first_labels : ``(K+1) x h x w`` soft labels of frame 0
    params : the protocol (context, radius, topk, temperature, restrict_first, tile)
    on_frame : called after each propagated frame

    Yields
    ------
    ``(K+1) x h x w`` soft labels of frames 0, 1, ..., T-1 (frame 0's are ``first_labels``).
    """
    params = params.checked()
    geometry = _Geometry(features.shape[-2:], params.radius, params.tile, features.device)
    padded_features = geometry.pad(features)
    padded_labels = {0: geometry.pad(first_labels[None])[0]}
    first = (None if params.restrict_first else features[0], first_labels)
    yield first_labels
    for t in range(1, features.shape[0]):
        slots = ([0] if params.restrict_first else []) + context_slots(t, params.context)
        slot_labels = torch.stack([padded_labels[s] for s in slots])
        current = _propagate_frame(features[t], first, (padded_features, slots, slot_labels), geometry, params)
        padded_labels[t] = geometry.pad(current[None])[0]
        if t - params.context > 0:  # older than the next frame's context; frame 0 stays
            del padded_labels[t - params.context]
        if on_frame is not None:
            on_frame()
        yield current


# --------------------------------------------------------------------------- whole sequences


def _propagate_crw(model, frames, first_ids, params, progress):
    height, width = frames.shape[1:3]
    input_scale = params.input_scale or model.default_input_scale
    start = time.perf_counter()
    features = sequence_features(model, frames, input_scale, params.stride, params.batch_size,
                                 on_batch=progress.update)
    feature_time = time.perf_counter() - start
    progress.set_postfix_str("propagate")
    start = time.perf_counter()
    first = soft_labels(first_ids, features.shape[-2:], features.device)
    ids = np.empty((len(frames), height, width), dtype=np.uint8)
    for t, labels in enumerate(propagate_labels(features, first, params, on_frame=lambda: progress.update(1))):
        ids[t] = labels_to_ids(labels, (height, width))
    ids[0] = first_ids
    return ids, {"features_s": feature_time, "propagation_s": time.perf_counter() - start}


def _centre_square(width: int, height: int) -> tuple[int, int]:
    """Columns ``[left, right)`` of the centre square (the whole width when not landscape)."""
    crop = (width - height) // 2 if width > height else 0
    return crop, width - crop


def _nearest_first_frame(query: torch.Tensor, keys: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Index of the best key (argmax dot product) for each query: ``N x C``, ``C x M`` -> N."""
    return torch.cat([(query[i:i + chunk] @ keys).argmax(dim=1) for i in range(0, len(query), chunk)])


def _propagate_original(model, frames, first_ids, progress):
    """The original code's protocol (see the module docstring)."""
    height, width = frames.shape[1:3]
    left, right = _centre_square(width, height)
    small = frames[:, ::4, left:right:4]
    start = time.perf_counter()
    features = []
    for i in range(0, len(small)):
        image = _to_images(small[i:i + 1], model.device)
        features.append(F.normalize(_resample(model(image), image.shape[-2:]), dim=1)[0])
        progress.update(1)
    feature_time = time.perf_counter() - start
    start = time.perf_counter()
    rows, cols = small.shape[1:3]
    # the first mask's label of each 1/4-scale cell, read at pixel offset 2 into the cell
    label_rows = np.minimum(np.arange(rows) * 4 + 2, height - 1)
    label_cols = np.minimum(left + np.arange(cols) * 4 + 2, right - 1)
    cell_labels = torch.from_numpy(first_ids[np.ix_(label_rows, label_cols)].reshape(-1).astype(np.int64))
    keys = features[0].reshape(features[0].shape[0], -1)
    ids = np.repeat(first_ids[None], len(frames), axis=0)
    for t in range(1, len(frames)):
        match = _nearest_first_frame(features[t].reshape(keys.shape[0], -1).t(), keys).cpu()
        small_ids = cell_labels[match].view(rows, cols).numpy().astype(np.uint8)
        full = np.repeat(np.repeat(small_ids, 4, axis=0), 4, axis=1)
        ids[t, :, left:right] = full[:height, : right - left]
        progress.update(1)
    return ids, {"features_s": feature_time, "propagation_s": time.perf_counter() - start}


class _NoProgress:
    def update(self, n=1):
        pass

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


def propagate_sequence(model, frames: np.ndarray, first_ids: np.ndarray, params: PropagationParams | None = None,
                       progress: bool = True, name: str = "") -> tuple[np.ndarray, dict]:
    """Object ids of every frame of a sequence from the first frame's.

    Parameters
    ----------
    model : a ``FeatureModel`` (``fmapicon.features``); ignored (may be None) for ``copy``
    frames : uint8 ``T x H x W x 3`` RGB
    first_ids : ``H x W`` ids of frame 0 (0 background, 1..K objects, 255 void -> 0)
    params : the protocol; ``PropagationParams()`` when None
    progress : show a tqdm bar for this sequence
    name : the bar's label

    Returns
    -------
    ids : uint8 ``T x H x W`` (frame 0 is ``first_ids`` with void set to 0)
    timings : ``{"features_s", "propagation_s"}`` seconds
    """
    from tqdm import tqdm

    params = (params or PropagationParams()).checked()
    first_ids = np.where(first_ids == VOID, 0, first_ids).astype(np.uint8)
    if first_ids.shape != frames.shape[1:3]:
        raise UserError(f"{name or 'sequence'}: first mask is {first_ids.shape} but frames are {frames.shape[1:3]}")
    if params.protocol == "copy":
        return np.repeat(first_ids[None], len(frames), axis=0), {"features_s": 0.0, "propagation_s": 0.0}
    total = len(frames) + len(frames) - 1
    bar = tqdm(total=total, desc=name or "propagate", unit="step", leave=False) if progress else _NoProgress()
    try:
        with torch.no_grad():
            if params.protocol == "original":
                return _propagate_original(model, frames, first_ids, bar)
            return _propagate_crw(model, frames, first_ids, params, bar)
    finally:
        bar.close()


# --------------------------------------------------------------------------- DAVIS evaluation


def _resolve_model(model, params: PropagationParams, device):
    """(FeatureModel or None for copy, its name)."""
    from fmapicon.features import load_model

    if params.protocol == "copy" or (isinstance(model, str) and model == "copy"):
        return None, "copy"
    kwargs = {"stride": params.stride} if model == "pixels" else {}
    loaded = load_model(model, device, **kwargs)
    return loaded, loaded.name


def evaluate_davis(model, davis_root, out_dir, set_name: str = "val", sequences=None,
                   params: PropagationParams | None = None, device="cpu", progress: bool = True,
                   exclude_void: bool = False) -> dict:
    """Propagate the first masks of a DAVIS set, write and score the predictions.

    Parameters
    ----------
    model : a spec for ``fmapicon.features.load_model`` (run folder, checkpoint, ``pixels``,
        ``random``, ``xfeat``), ``copy``, a ``FeatureModel`` or an ``nn.Module``
    davis_root : folder with ``JPEGImages/480p``, ``Annotations/480p``, ``ImageSets``
    out_dir : where ``<seq>/<frame>.png`` (indexed, DAVIS palette), the two toolkit CSVs
        and ``eval.json`` (the protocol actually used, per-sequence timings) are written
    set_name, sequences : which sequences (see ``fmapicon.davis.sequence_names``)
    params : the protocol; ``copy`` as model implies ``protocol="copy"``
    device : where features and affinities are computed

    Returns
    -------
    the score of ``fmapicon.metrics.score_davis`` plus ``"timings"`` and ``"eval_json"``.
    """
    from fmapicon import __version__
    from fmapicon.davis import annotation_paths, frame_paths, layout, read_annotation, read_frames, sequence_names, write_indexed_png
    from fmapicon.metrics import format_results, score_davis, write_results
    from fmapicon.runtime import atomic_write, resolve_device

    params = (params or PropagationParams()).checked()
    if isinstance(model, str) and model == "copy":
        params = dataclasses.replace(params, protocol="copy")
    device = resolve_device(device) if isinstance(device, str) else device
    images_dir, annotations_dir = layout(davis_root)
    names = sequence_names(davis_root, set_name, sequences)
    feature_model, model_name = _resolve_model(model, params, device)
    input_scale = None if feature_model is None else (params.input_scale or feature_model.default_input_scale)
    out_dir = Path(out_dir)
    timings = {}
    for name in names:
        paths = frame_paths(images_dir, name)
        frames = read_frames(paths)
        first_ids = read_annotation(annotation_paths(annotations_dir, name)[0])
        ids, timing = propagate_sequence(feature_model, frames, first_ids, params, progress, name)
        for path, frame_ids in zip(paths, ids):
            write_indexed_png(out_dir / name / f"{path.stem}.png", frame_ids)
        timings[name] = {"frames": len(frames), "height": frames.shape[1], "width": frames.shape[2], **timing}
    results = score_davis(davis_root, out_dir, set_name, names, exclude_void=exclude_void, progress=progress)
    write_results(results, out_dir, set_name)
    record = {
        "model": model_name, "protocol": params.protocol, "params": dataclasses.asdict(params),
        "input_scale": input_scale, "device": str(device), "davis": str(davis_root), "set": set_name,
        "sequences": names, "exclude_void": exclude_void, "timings": timings, "totals": _totals(timings),
        "global": results["global"], "objects": results["objects"], "jf_mean": results["jf_mean"],
        "fmapicon": __version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    eval_json = out_dir / "eval.json"
    with atomic_write(eval_json, "w") as handle:
        handle.write(json.dumps(record, indent=2, allow_nan=True) + "\n")
    return {**results, "timings": timings, "totals": record["totals"], "eval_json": str(eval_json),
            "table": format_results(results), "model": model_name, "input_scale": input_scale}


def _totals(timings: dict) -> dict:
    frames = sum(t["frames"] for t in timings.values())
    features = sum(t["features_s"] for t in timings.values())
    propagation = sum(t["propagation_s"] for t in timings.values())
    per_frame = (lambda s: s / frames if frames else None)
    return {"frames": frames, "features_s": features, "propagation_s": propagation,
            "features_s_per_frame": per_frame(features), "propagation_s_per_frame": per_frame(propagation)}
