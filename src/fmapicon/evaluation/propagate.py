"""Label propagation through a video: the protocol of CRW (ajabri/videowalk).

The DAVIS harness (``evaluate_davis``) is ``fmapicon.evaluation.davis_eval``.

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
   the radius there too). With ``pixels_weight`` w > 0 the affinity fuses the model's
   cosine with the ``pixels`` baseline's (Lab colour patches on the same cells, at scale 1):
   ``((1 - w) <f_q, f_k> + w <p_q, p_k>) / temperature`` (``fuse_features``). The ``topk``
   largest affinities over all context keys together are kept and softmax-normalized; the
   query's soft label is their weighted sum of the keys' soft labels. It becomes frame t's
   context label for later frames.
5. Output: the soft labels bilinearly up-sampled to H x W (align_corners=False), argmax.

Memory stays bounded: query cells are processed in tiles of ``tile x tile``; each tile
meets only the ``(tile + 2m)^2`` key cells (m = ceil(radius) - 1) around it in each
short-term frame, masked to the radius, never a whole frame pair. Only the unrestricted
first frame is scored against all of its cells, 1024 query cells at a time. Each key frame
is visited once, for all the query frames whose context holds it; beyond the sequence's
feature maps the working memory is one band of tiles and a running top-k per pending
frame (about 0.5 GB peak over the features on 1152 x 480 frames).

Speed, never the result (ties aside): a query frame's unrestricted first-frame candidates
are gathered when the frame is first met, so the k-th best affinity known for each query
is a lower bound of its final k-th; of each short-term window only the affinities above it
are kept (one or two per query on DAVIS), and a full top-k runs only on the windows where
more than k pass. Masking adds a precomputed 0 / -inf bias in place.

``protocol="original"`` is the original FeatureMapICON code's evaluation
(``fmapicon.evaluation.original_protocol``); ``protocol="copy"`` repeats the first mask.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

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
    pixels_weight : w in [0, 1), the share of the ``pixels`` baseline's cosine in the
        affinity, ``(1 - w) cos(model) + w cos(pixels)``; 0 (default): the model alone
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
    pixels_weight: float = 0.0
    restrict_first: bool = False
    tile: int = 4
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
        if not 0 <= self.pixels_weight < 1:
            problems.append(f"pixels_weight must be in [0, 1), got {self.pixels_weight} (1 would be the pixels "
                            "baseline alone: use --model pixels)")
        elif self.pixels_weight > 0 and self.protocol != "crw":
            problems.append(f"pixels_weight fuses affinities of the crw protocol, not of {self.protocol!r}")
        if problems:
            raise UserError("bad propagation parameters: " + "; ".join(problems))
        return self


# --------------------------------------------------------------------------- features and labels


def to_images(frames: np.ndarray, device) -> torch.Tensor:
    """uint8 ``T x H x W x 3`` -> float ``T x 3 x H x W`` in [0, 1] on ``device``."""
    tensor = torch.from_numpy(np.ascontiguousarray(frames)).to(device)
    return tensor.permute(0, 3, 1, 2).float() / 255.0


def cell_grid(height: int, width: int, stride: int) -> tuple[int, int]:
    """The feature cells over a frame: ``fmapicon.evaluation.features.stride_grid`` (round(H / stride),
    round(W / stride), at least 1), the grid of ``sequence_features``."""
    from fmapicon.evaluation.features import stride_grid

    return stride_grid(height, width, stride)


def sequence_features(model, frames: np.ndarray, input_scale: float, stride: int, batch_size: int = 4,
                      on_batch=None) -> torch.Tensor:
    """Unit features of a sequence on the stride grid: ``T x C x h x w`` (model's device).

    Each batch of frames (uint8 ``T x H x W x 3``) goes through
    ``fmapicon.evaluation.features.extract(model, images, scale=input_scale, stride=stride)``:
    resized by ``input_scale``, the model's map resampled onto ``cell_grid(H, W, stride)``,
    L2-normalized. ``on_batch(n)`` is called after each batch.
    """
    from fmapicon.evaluation.features import extract

    out = []
    for start in range(0, len(frames), batch_size):
        images = to_images(frames[start:start + batch_size], model.device)
        out.append(extract(model, images, scale=input_scale, stride=stride))
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


def _key_users(s: int, frames: int, params: PropagationParams) -> list[tuple[int, int]]:
    """``(t, copies)`` for every query frame t whose radius-restricted context holds key
    frame s, ``copies`` times (frame 0 fills the early contexts several times)."""
    also_first = s == 0 and params.restrict_first
    last = frames - 1 if also_first else min(frames - 1, s + params.context)
    return [(t, context_slots(t, params.context).count(s) + int(also_first)) for t in range(s + 1, last + 1)]


def _radius_offsets(radius: float, size) -> int:
    """m: the largest offset along one axis with |d| < radius, capped by the grid."""
    return max(0, min(math.ceil(radius) - 1, max(size) - 1))


class _Tiles:
    """Index bookkeeping of the tiled radius-restricted affinities on an ``h x w`` grid.

    Query cells are grouped in ``tile x tile`` tiles (the grid padded to whole tiles) and
    listed in *tile order*: tile row, tile column, then row-major within the tile (Q =
    tile^2 cells per tile, Nq cells in all). Key maps are padded by m on every side; the
    tile at (i, j) meets the padded window ``[i tile, i tile + side) x [j tile, j tile +
    side)`` of each key frame, side = tile + 2m (R = side^2 cells), of which a query keeps
    the cells within the radius that lie on the frame (not ``invalid``). Labels of all frames live
    in one store of ``T x padded`` cells; an index ``frame * plane + padded position``
    names a key cell.
    """

    def __init__(self, grid, radius: float, tile: int, device, dtype=torch.float32):
        self.h, self.w = grid
        self.tile, self.m = tile, _radius_offsets(radius, grid)
        self.rows, self.cols = -(-self.h // tile), -(-self.w // tile)
        self.side = tile + 2 * self.m
        self.padded = (self.rows * tile + 2 * self.m, self.cols * tile + 2 * self.m)
        self.plane = self.padded[0] * self.padded[1]
        window, query = torch.arange(self.side, device=device), torch.arange(tile, device=device)
        offset = window[None, :] - self.m - query[:, None]                       # tile x side
        distance = offset[:, None, :, None] ** 2 + offset[None, :, None, :] ** 2  # qy qx ry rx
        within = (distance < radius**2).reshape(tile * tile, -1)               # Q x R
        ys = torch.arange(self.rows, device=device)[:, None] * tile + window - self.m  # rows x side
        xs = torch.arange(self.cols, device=device)[:, None] * tile + window - self.m  # cols x side
        on_y, on_x = (ys >= 0) & (ys < self.h), (xs >= 0) & (xs < self.w)
        inside = (on_y[:, None, :, None] & on_x[None, :, None, :]).reshape(self.rows, self.cols, -1)
        invalid = ~(within[None, None] & inside[:, :, None, :])                # rows x cols x Q x R
        # 0 for the kept key cells, -inf for the others: adding it in place is several
        # times cheaper than masked_fill_ with a broadcast mask, and exact (x + 0 = x)
        self.bias = torch.zeros(invalid.shape, device=device, dtype=dtype).masked_fill_(invalid, -math.inf)
        # padded position of window cell r of tile column j in tile row i:
        # (i tile + r // side) W' + j tile + r % side
        self.window_origin = torch.arange(self.cols, device=device) * tile     # + i tile W'
        grid_y = torch.arange(self.h, device=device)[:, None] + self.m
        grid_x = torch.arange(self.w, device=device)[None, :] + self.m
        self.grid_index = (grid_y * self.padded[1] + grid_x).reshape(-1)      # row-major cells

    def pad_keys(self, maps: torch.Tensor) -> torch.Tensor:
        """``N x C x h x w`` -> ``N x C x padded`` (zeros around; masked anyway)."""
        bottom, right = self.padded[0] - self.h - self.m, self.padded[1] - self.w - self.m
        return F.pad(maps, (self.m, right, self.m, bottom))

    def arrange(self, features: torch.Tensor) -> torch.Tensor:
        """``T x C x h x w`` -> queries ``rows x cols x T x Q x C`` (tile order)."""
        tile = self.tile
        padded = F.pad(features, (0, self.cols * tile - self.w, 0, self.rows * tile - self.h))
        frames, channels = features.shape[:2]
        blocks = padded.reshape(frames, channels, self.rows, tile, self.cols, tile)
        return blocks.permute(2, 4, 0, 3, 5, 1).reshape(self.rows, self.cols, frames, tile * tile, channels)

    def windows(self, padded: torch.Tensor, row: int) -> torch.Tensor:
        """Key windows of tile row ``row`` in one padded key map ``C x padded``: ``cols x C x R``."""
        strip = padded[:, row * self.tile: row * self.tile + self.side]      # C x side x W'
        strip = strip.unfold(2, self.side, self.tile)                        # C x side x cols x side
        return strip.permute(2, 0, 1, 3).reshape(self.cols, padded.shape[0], -1)

    def to_grid(self, values: torch.Tensor) -> torch.Tensor:
        """``Nq x K`` in tile order -> ``K x h x w``."""
        tile = self.tile
        blocks = values.reshape(self.rows, self.cols, tile, tile, -1).permute(4, 0, 2, 1, 3)
        return blocks.reshape(values.shape[-1], self.rows * tile, self.cols * tile)[:, : self.h, : self.w]

    def store(self, store: torch.Tensor, t: int, labels: torch.Tensor) -> None:
        """Put frame t's labels ``K x h x w`` into the store ``(T plane) x K``."""
        padded = self.pad_keys(labels[None])[0]
        store[t * self.plane:(t + 1) * self.plane] = padded.permute(1, 2, 0).reshape(self.plane, -1)


def _topk_above(scores: torch.Tensor, k: int, floor):
    """Per row of ``scores`` (``... x R``), at most k candidates, ``(values, positions)``
    each ``... x k``, that hold every entry of the row's top-k above ``floor`` (``...``):
    the row's top-k when more than k of its entries lie above the floor, else exactly the
    entries above it, the free slots filled with ``-inf`` (position 0).

    ``floor`` is the k-th best affinity already known for the row's query, a lower bound
    of its final k-th, so an entry at or below it cannot enter the final top-k (ties
    aside) and the result merges into the same top-k as ``scores.topk(k)``. Few entries
    pass (one or two per row on DAVIS): a comparison and ``nonzero`` cost a fraction
    of a top-k selection. Without a floor, or while one is -inf, this is ``topk``.
    """
    if floor is None or not bool(torch.isfinite(floor).all()):
        return scores.topk(k, dim=-1)
    size = scores.shape[-1]
    rows = scores.reshape(-1, size)
    above = (scores > floor[..., None]).view(-1).nonzero().squeeze(1)   # flat positions
    row, position = above // size, above % size
    counts = torch.bincount(row, minlength=rows.shape[0])
    values = rows.new_full((rows.shape[0], k), -math.inf)
    index = torch.zeros(rows.shape[0], k, dtype=torch.long, device=rows.device)
    few = counts[row] <= k
    slot = torch.arange(len(above), device=rows.device) - (torch.cumsum(counts, 0) - counts)[row]
    values[row[few], slot[few]] = rows.reshape(-1)[above[few]]
    index[row[few], slot[few]] = position[few]
    many = (counts > k).nonzero().squeeze(1)
    if many.numel():
        v, r = rows.index_select(0, many).topk(k, dim=-1)
        values.index_copy_(0, many, v)
        index.index_copy_(0, many, r)
    return values.view(*scores.shape[:-1], k), index.view(*scores.shape[:-1], k)


@torch.no_grad()
def _radius_topk(tiles: _Tiles, queries, keys, s: int, users: range, topk: int, floor=None):
    """Top-k affinities of the query frames ``users`` (consecutive) over key frame s within
    the radius.

    queries : ``rows x cols x T x Q x C`` (``_Tiles.arrange``); keys : ``C x padded`` of frame s
    floor : None, or ``U x rows x cols x Q``, the k-th best affinity known per query: then
        only the candidates above it are kept (``_topk_above``; -inf fills the rest)
    Returns values and store indices, each ``U x Nq x k`` (k = min(topk, R)).
    """
    count, size = len(users), tiles.side**2
    k = min(topk, size)
    values, index = [], []
    for row in range(tiles.rows):
        q = queries[row][:, users.start:users.stop]                  # cols x U x Q x C (a view)
        cols, _, cells, channels = q.shape
        scores = torch.bmm(q.reshape(cols, count * cells, channels), tiles.windows(keys, row))
        scores = scores.view(cols, count, cells, size)
        scores.add_(tiles.bias[row][:, None])
        v, r = _topk_above(scores, k, None if floor is None else floor[:, row].transpose(0, 1))
        origin = (tiles.window_origin + row * tiles.tile * tiles.padded[1])[:, None, None, None]
        values.append(v)
        index.append(origin + (r // tiles.side) * tiles.padded[1] + r % tiles.side)

    def tile_order(parts):
        return torch.stack(parts).permute(2, 0, 1, 3, 4).reshape(count, -1, k)

    return tile_order(values), tile_order(index) + s * tiles.plane


@torch.no_grad()
def _first_frame_topk(tiles: _Tiles, queries: torch.Tensor, first_keys: torch.Tensor, topk: int,
                      chunk: int = 1024):
    """Top-k affinities of queries ``Nq x C`` over all cells of frame 0 (``C x hw``)."""
    k = min(topk, first_keys.shape[1])
    values, index = [], []
    for start in range(0, queries.shape[0], chunk):
        v, i = (queries[start:start + chunk] @ first_keys).topk(k, dim=-1)
        values.append(v)
        index.append(tiles.grid_index[i])
    return torch.cat(values), torch.cat(index)


def _reduce(candidates: list, topk: int):
    """Top-k over the union of candidate sets ``[(values, index), ...]`` (``Nq x k_i`` each)."""
    if len(candidates) == 1 and candidates[0][0].shape[-1] <= topk:
        return candidates[0]
    values = torch.cat([v for v, _ in candidates], dim=-1)
    index = torch.cat([i for _, i in candidates], dim=-1)
    values, pick = values.topk(min(topk, values.shape[-1]), dim=-1)
    return values, torch.gather(index, -1, pick)


def _meet_key_frame(pending: dict, tiles: _Tiles, queries, keys, s: int, params: PropagationParams,
                    first=None) -> None:
    """Add key frame s's radius-restricted candidates to every query frame whose context
    holds it (``pending[t]``: a short list of candidate sets, reduced to one when it grows).

    ``first(t)``, when given, gives frame t's unrestricted first-frame candidates; they
    seed ``pending[t]`` the first time t is met, so that the k-th best known affinity of
    each query (a lower bound of its final k-th) lets ``_topk_above`` skip hopeless rows.
    """
    users = _key_users(s, queries.shape[2], params)
    for start in range(0, len(users), params.context):
        batch = users[start:start + params.context]
        floor = None
        if first is not None:
            for t, _ in batch:
                if not pending[t]:
                    pending[t] = [first(t)]
            floor = torch.stack([_kth_best(pending, t, params.topk) for t, _ in batch])
            floor = floor.view(len(batch), tiles.rows, tiles.cols, -1)
        values, index = _radius_topk(tiles, queries, keys[s], s, range(batch[0][0], batch[-1][0] + 1), params.topk,
                                     floor)
        for u, (t, copies) in enumerate(batch):
            # copies, not views: a view would keep the whole batch's tensor alive
            pending[t] += [(values[u].clone(), index[u].clone())] * min(copies, params.topk)
            if len(pending[t]) >= 4:
                pending[t] = [_reduce(pending[t], params.topk)]


def _kth_best(pending: dict, t: int, topk: int) -> torch.Tensor:
    """The k-th best affinity among frame t's known candidates, per query (``Nq``);
    -inf while fewer than k are known. Reduces ``pending[t]`` to one set."""
    pending[t] = [_reduce(pending[t], topk)]
    values = pending[t][0][0]
    if values.shape[-1] < topk:
        return values.new_full(values.shape[:1], -math.inf)
    return values.amin(dim=-1)


@torch.no_grad()
def _finish_frame(candidates: list, tiles: _Tiles, store, params: PropagationParams):
    """Soft labels ``(K+1) x h x w`` of a frame from its candidate sets (the first
    frame's unrestricted candidates among them unless ``restrict_first``: see
    ``_meet_key_frame``): softmax over the top-k of affinity / temperature, weighting the
    candidates' labels."""
    values, index = _reduce(candidates, params.topk)
    weights = torch.softmax(values / params.temperature, dim=-1)
    return tiles.to_grid((weights[..., None] * store[index]).sum(dim=1))


def propagate_labels(features: torch.Tensor, first_labels: torch.Tensor, params: PropagationParams,
                     on_frame=None):
    """CRW label propagation on feature maps; yields the soft labels of every frame in order.

    The affinities do not depend on the labels, so each key frame s is met once, by all
    the query frames whose context holds it (a running top-k per query frame gathers the
    candidates); frame t is finished as soon as its last context frame, t - 1, was met.
    The result equals the dense computation (top-k of the masked full affinities), ties aside.

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
    frames, channels = features.shape[:2]
    tiles = _Tiles(features.shape[-2:], params.radius, params.tile, features.device, features.dtype)
    queries, keys = tiles.arrange(features), tiles.pad_keys(features)
    first_keys = features[0].reshape(channels, -1)
    store = features.new_zeros(frames * tiles.plane, first_labels.shape[0])  # labels of all frames
    tiles.store(store, 0, first_labels)
    pending = {t: [] for t in range(1, frames)}
    def whole_first_frame(t):
        return _first_frame_topk(tiles, queries[:, :, t].reshape(-1, channels), first_keys, params.topk)

    first = None if params.restrict_first else whole_first_frame
    yield first_labels
    for s in range(frames - 1):
        _meet_key_frame(pending, tiles, queries, keys, s, params, first)
        t = s + 1  # every context frame of t has been met
        current = _finish_frame(pending.pop(t), tiles, store, params)
        tiles.store(store, t, current)
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
    if params.pixels_weight > 0:
        from fmapicon.evaluation.features import fuse_features, pixels_model

        colour = sequence_features(pixels_model(params.stride).to(features.device), frames, 1.0, params.stride,
                                   params.batch_size)
        features = fuse_features(features, colour, params.pixels_weight)
    feature_time = time.perf_counter() - start
    progress.set_postfix_str("propagate")
    start = time.perf_counter()
    first = soft_labels(first_ids, features.shape[-2:], features.device)
    ids = np.empty((len(frames), height, width), dtype=np.uint8)
    for t, labels in enumerate(propagate_labels(features, first, params, on_frame=lambda: progress.update(1))):
        ids[t] = labels_to_ids(labels, (height, width))
    ids[0] = first_ids
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
    model : a ``FeatureModel`` (``fmapicon.evaluation.features``); ignored (may be None) for ``copy``
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
                from fmapicon.evaluation.original_protocol import propagate_original

                return propagate_original(model, frames, first_ids, bar)
            return _propagate_crw(model, frames, first_ids, params, bar)
    finally:
        bar.close()
