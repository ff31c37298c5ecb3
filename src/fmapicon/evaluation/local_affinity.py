"""The tiled affinities of CRW label propagation (``fmapicon.evaluation.propagate``): the
top-k key cells of each query cell of one frame in a key frame, within a radius on the
feature grid, or over the whole (first) frame.

Query cells are processed in ``tile x tile`` tiles; each tile meets only the ``(tile +
2m)^2`` key cells (m = ceil(radius) - 1) around it, never a whole frame pair, and a query
keeps the cells with ``|q - k| < radius`` (Euclidean, in cells) that lie on the frame.
The unrestricted first frame is scored against all of its cells, ``chunk`` query cells at
a time (small blocks that stay in the CPU's cache).

Pruning, never a different result (ties aside): given a *floor* per query, a lower bound
of the k-th best affinity it will finally keep, an entry at or below the floor cannot
enter its top-k. ``window_candidates`` then returns only the entries above the floor,
as sparse triples, and runs a full top-k only on the rows where more than k pass. The
tighter the floor, the fewer entries pass: ``NearFloor`` gives one from a few key
frames' cells near where each query's content moved (the camera's pan followed), before
any full product, lowered by ``rounding_margin`` so that the same entries, found again by
another kernel, never fall below it. Where bf16 products are
native (``bf16_is_faster``), the entries above a floor are found by a bf16 product first
(``window_candidates``' and ``FrameSearch``'s ``coarse``: within ``rounded_product_error``)
and only those are scored in float32, by a sampled product (``sampled_product``); frame 0's
search by an int8 product where that is faster still (``int8_is_faster``).

Threads: on CPU the blocks (tile rows, query chunks) are spread over
``torch.get_num_threads()`` Python threads (``parallel_map``; torch releases the GIL in its
kernels): the pruning's ``nonzero`` and gathers run on one core each, so splitting the
work by blocks uses the cores where splitting each kernel does not.
"""

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F


def radius_offsets(radius: float, size) -> int:
    """m: the largest offset along one axis with |d| < radius, capped by the grid."""
    return max(0, min(math.ceil(radius) - 1, max(size) - 1))


def window_offsets(tile: int, m: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dy, dx)``, each ``Q x R``: the offset, key minus query in cells, of each window cell
    (R = side^2, side = tile + 2m, row-major) from each query cell of a ``tile x tile`` tile
    (Q = tile^2, row-major), the window starting m cells before the tile on each axis."""
    side = tile + 2 * m
    offset = torch.arange(side, device=device)[None, :] - m - torch.arange(tile, device=device)[:, None]
    shape = (tile, tile, side, side)                                     # qy qx ry rx
    return (offset[:, None, :, None].expand(shape).reshape(tile * tile, -1),
            offset[None, :, None, :].expand(shape).reshape(tile * tile, -1))


def on_axis(start: torch.Tensor, side: int, size: int) -> torch.Tensor:
    """``N x side`` booleans: whether each of ``side`` consecutive positions from ``start``
    (``N``, grid positions along one axis) lies on the grid's ``size`` cells."""
    position = start[:, None] + torch.arange(side, device=start.device)
    return (position >= 0) & (position < size)


_POOLS: dict[int, ThreadPoolExecutor] = {}
os.register_at_fork(after_in_child=_POOLS.clear)     # a pool's threads do not survive a fork


def parallel_map(fn, items, device) -> list:
    """``[fn(x) for x in items]``, in order; on a CPU device spread over
    ``torch.get_num_threads()`` threads (one pool per count, made once). ``fn`` runs under
    ``torch.no_grad`` (grad mode is per thread)."""
    items = list(items)
    workers = torch.get_num_threads() if torch.device(device).type == "cpu" else 1
    if workers < 2 or len(items) < 2:
        return [fn(x) for x in items]
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="fmapicon-affinity")

    def run(x):
        with torch.no_grad():
            return fn(x)

    return list(_POOLS[workers].map(run, items))


class Tiles:
    """Index bookkeeping of the tiled radius-restricted affinities on an ``h x w`` grid.

    Query cells are grouped in ``tile x tile`` tiles (the grid padded to whole tiles) and
    listed in *tile order*: tile row, tile column, then row-major within the tile (Q =
    tile^2 cells per tile, Nq cells in all). Key maps are padded by m on every side; the
    tile at (i, j) meets the padded window ``[i tile, i tile + side) x [j tile, j tile +
    side)`` of each key frame, side = tile + 2m, less the window rows that hold only padding
    (``window_rows[i]`` = ``(y0, y1)``: R = (y1 - y0) side cells; ``valid[i]`` and ``bias[i]``
    are ``cols x Q x R``; the tile rows at the grid's top and bottom skip that much of the
    product). Labels live in a store
    of ``slots x plane`` cells (``plane``: the padded map's cells); an index ``slot * plane +
    padded position`` names a key cell.
    """

    def __init__(self, grid, radius: float, tile: int, device, dtype=torch.float32):
        self.h, self.w = grid
        self.tile, self.m, self.radius = tile, radius_offsets(radius, grid), radius
        self.rows, self.cols = -(-self.h // tile), -(-self.w // tile)
        self.side = tile + 2 * self.m
        self.padded = (self.rows * tile + 2 * self.m, self.cols * tile + 2 * self.m)
        self.plane = self.padded[0] * self.padded[1]
        self.cells = self.rows * self.cols * tile * tile
        dy, dx = window_offsets(tile, self.m, device)
        within = dy**2 + dx**2 < radius**2                                      # Q x R
        on_y = on_axis(torch.arange(self.rows, device=device) * tile - self.m, self.side, self.h)  # rows x side
        on_x = on_axis(torch.arange(self.cols, device=device) * tile - self.m, self.side, self.w)  # cols x side
        inside = (on_y[:, None, :, None] & on_x[None, :, None, :]).reshape(self.rows, self.cols, -1)
        valid = (within[None, None] & inside[:, :, None, :]).view(self.rows, self.cols, tile * tile, self.side, -1)
        self.window_rows = [(max(0, self.m - i * tile), min(self.side, self.m + self.h - i * tile))
                            for i in range(self.rows)]
        self.valid = [valid[i, :, :, y0:y1].reshape(self.cols, tile * tile, -1).contiguous()
                      for i, (y0, y1) in enumerate(self.window_rows)]
        # 0 for the kept key cells, -inf for the others: adding it in place is several
        # times cheaper than masked_fill_ with a broadcast mask, and exact (x + 0 = x)
        self.bias = [torch.zeros(v.shape, device=device, dtype=dtype).masked_fill_(~v, -math.inf) for v in self.valid]
        self.window_origin = torch.arange(self.cols, device=device) * tile     # + i tile W'
        grid_y = torch.arange(self.h, device=device)[:, None] + self.m
        grid_x = torch.arange(self.w, device=device)[None, :] + self.m
        self.grid_index = (grid_y * self.padded[1] + grid_x).reshape(-1)      # row-major cells
        self.on_grid = self.arrange(torch.ones(1, 1, self.h, self.w, device=device)).reshape(-1) == 1  # Nq

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

    def windows(self, padded: torch.Tensor, row: int, cols: slice, multiple: int = 1) -> torch.Tensor:
        """Key windows of tile row ``row``, tile columns ``cols``, in one padded key map
        ``C x padded``: ``n x C x R`` (the window rows on the grid, ``window_rows[row]``),
        followed by zero keys up to a multiple of ``multiple`` cells."""
        start = cols.start * self.tile
        stop = (cols.stop - 1) * self.tile + self.side
        y0, y1 = self.window_rows[row]
        strip = padded[:, row * self.tile + y0: row * self.tile + y1, start:stop]  # C x rows x width
        strip = strip.unfold(2, self.side, self.tile).permute(2, 0, 1, 3)         # n x C x rows x side
        n, channels, size = cols.stop - cols.start, padded.shape[0], (y1 - y0) * self.side
        if size % multiple == 0:
            return strip.reshape(n, channels, size)
        out = padded.new_empty(n, channels, size - size % multiple + multiple)
        out[..., size:] = 0
        out[..., :size].view(n, channels, y1 - y0, self.side).copy_(strip)
        return out

    def to_grid(self, values: torch.Tensor) -> torch.Tensor:
        """``Nq x K`` in tile order -> ``K x h x w``."""
        tile = self.tile
        blocks = values.reshape(self.rows, self.cols, tile, tile, -1).permute(4, 0, 2, 1, 3)
        return blocks.reshape(values.shape[-1], self.rows * tile, self.cols * tile)[:, : self.h, : self.w]

    def key_index(self, row: int, cols: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Padded position of window cell ``r`` of tile ``(row, cols)``: ``(i tile + y0 + r //
        side) W' + j tile + r % side`` (``y0`` the window's first row on the grid)."""
        origin = self.window_origin[cols] + (row * self.tile + self.window_rows[row][0]) * self.padded[1]
        return origin + (r // self.side) * self.padded[1] + r % self.side


class RunningTopK:
    """The k best candidates found so far of each query cell of U query frames, kept as
    ``window_candidates`` meets key frame after key frame: its blocks (disjoint query cells,
    on several threads at once) merge their entries in, and the k-th best so far raises
    the floor of the key frames met later (k real entries that large are candidates).

    values, index : ``U x Nq x k`` (tile order; -inf / 0 where empty), updated in place
        (views of the caller's buffers)
    copies : ``U`` ints, how many times each query frame's context holds the key frame met
        now: its entries are merged that many times (CRW pads the context with copies of
        the first frame; at most k count)
    offset : added to the entries' padded key positions (the key frame's place in a store)
    """

    def __init__(self, values: torch.Tensor, index: torch.Tensor, copies=None, offset: int = 0):
        self.values, self.index, self.offset = values, index, offset
        self.copies = None
        if copies is not None and max(copies) > 1:
            self.copies = torch.tensor([min(c, values.shape[-1]) for c in copies], device=values.device)

    def kth(self, cells: slice) -> torch.Tensor:
        """``U x n``: the k-th best so far of the query cells ``cells`` (-inf while fewer than k)."""
        return self.values[:, cells].amin(dim=-1)

    def merge(self, cells: slice, user, query, value, key) -> None:
        """Merge entries (query frame 0..U-1, query cell within ``cells``, affinity, padded key
        position) into the rows of ``cells`` (only the rows they touch are read and written)."""
        if not len(value):
            return
        k, size = self.values.shape[-1], cells.stop - cells.start
        line = user * size + (query - cells.start)                       # U x size lines
        key = key + self.offset
        if self.copies is not None:
            repeat = self.copies.take(user)
            line, value, key = (x.repeat_interleave(repeat) for x in (line, value, key))
        touched, row = torch.unique(line, return_inverse=True)
        new_values, new_index = scatter_rows(row, value, key, len(touched))
        user, query = touched // size, touched % size + cells.start
        values = torch.cat([self.values[user, query], new_values], dim=-1)
        index = torch.cat([self.index[user, query], new_index], dim=-1)
        values, pick = values.topk(k, dim=-1)
        self.values[user, query], self.index[user, query] = values, index.gather(1, pick)


@torch.no_grad()
def window_candidates(tiles: Tiles, queries: torch.Tensor, keys: torch.Tensor, topk: int, floor=None,
                      coarse=None, running: RunningTopK | None = None, block_bytes: int = 16 << 20):
    """Candidates of U query frames among one key frame's cells within the radius.

    queries : ``rows x cols x U x Q x C`` (``Tiles.arrange``, frames consecutive)
    keys : ``C x padded`` (``Tiles.pad_keys``) of the key frame
    floor : None, or ``U x Nq`` (tile order), a lower bound of each query's final k-th
        best affinity; then only the entries above it are returned, a full top-k
        (of the radius-restricted row) running where more than k pass
    coarse : None, or ``(queries, query_rounding, keys, key_rounding)``: the queries and keys
        above in bfloat16 (``bf16_copy``: features of norm <= 1; for CPUs with native bf16
        products), the queries' rounding norms (``rows x cols x U x Q``) and the keys' largest
        (a number). With a finite floor the entries are then found by the bf16 product:
        those above ``floor - rounded_product_error`` are scored again in float32
        (``torch.sparse.sampled_addmm``), the same entries as without it, ties aside. A
        block where more than ``COARSE_SHARE`` of the scores pass, or with a floor at or
        below the error, is scored in float32 whole.
    running : None, or the U query frames' ``RunningTopK`` (k = ``topk``): each block merges
        its entries into it instead of returning them, and with a floor, prunes by the
        larger of the floor and the k-th best found so far (its earlier key frames')
    block_bytes : the size of one block of scores (speed only)

    Returns ``(user, query, value, key)`` 1-D tensors: query frame (0..U-1), query cell
    (tile order), affinity, padded key position; at most min(topk, R) per query, every
    entry of its radius-restricted top-k that lies above the floor among them. With
    ``running``: None.
    """
    rows, cols, count, cells, channels = queries.shape
    step = max(1, block_bytes // max(1, count * cells * tiles.side**2 * 4))
    prune = floor is not None and bool(torch.isfinite(floor).all())
    if prune:
        floor = floor.view(count, rows, cols, cells)
    coarse = coarse if prune else None

    def exact(row, span, scores, below):
        k = min(topk, scores.shape[-1])
        if prune:
            return _above_floor(scores, tiles, row, span, below, k)
        scores.add_(tiles.bias[row][span][:, None])
        values, r = scores.topk(k, dim=-1)
        c, u, q_cell, _ = torch.meshgrid(*(torch.arange(n, device=values.device) for n in values.shape),
                                         indexing="ij")
        keep = torch.isfinite(values).view(-1).nonzero().squeeze(1)
        return [x.reshape(-1).index_select(0, keep) for x in (c, u, q_cell, r, values)]

    def product(source, key_map, row, span, multiple=1):
        """Scores ``n x U x Q x R'``, R' the window's R cells and zero keys up to a multiple."""
        q = source[row, span].reshape(span.stop - span.start, count * cells, channels)
        return torch.bmm(q, tiles.windows(key_map, row, span, multiple)).view(span.stop - span.start, count, cells, -1)

    def block(where):
        row, start = where
        span = slice(start, min(cols, start + step))
        cells_of = slice((row * cols + span.start) * cells, (row * cols + span.stop) * cells)   # the block's queries
        found, below = None, floor[:, row, span].transpose(0, 1) if prune else None
        if prune and running is not None:
            kth = running.kth(cells_of).view(count, span.stop - span.start, cells).transpose(0, 1)
            below = torch.maximum(below, kth)
        if coarse is not None:
            low_queries, query_rounding, low_keys, key_rounding = coarse
            lowered = below - rounded_product_error(query_rounding[row, span], key_rounding, channels)
            if bool((lowered > 0).all()):                 # (the padding's zero keys never pass)
                scores = product(low_queries, low_keys, row, span, BF16_SEGMENT).view(torch.int16)
                found = _valid_above(scores, tiles, row, span, _bf16_product_threshold(lowered), BF16_SEGMENT)[1:]
                if len(found[0]) > COARSE_SHARE * scores.numel():
                    found = None
        if found is None:
            c, u, q_cell, r, values = exact(row, span, product(queries, keys, row, span), below)
            key = tiles.key_index(row, start + c, r)
        else:
            line, r, c, q_cell = found
            c, u, q_cell, key, values = _rescore(queries[row, span], columns, below, topk, line, c, q_cell,
                                                 tiles.key_index(row, start + c, r))
        query = ((row * cols) + start + c) * cells + q_cell
        if running is None:
            return u, query, values, key
        running.merge(cells_of, u, query, values, key)

    if coarse is not None:
        _consume_csr_warning()
        columns = keys.reshape(channels, -1).t().contiguous().t()         # (see sampled_product)
    blocks = [(row, start) for row in range(rows) for start in range(0, cols, step)]
    parts = parallel_map(block, blocks, queries.device)
    if running is None:
        return tuple(torch.cat([p[i] for p in parts]) for i in range(4))


def _bf16_bits_below(values: torch.Tensor) -> torch.Tensor:
    """The bit patterns (as int16) of the largest bfloat16 numbers at or below ``values``
    (positive float32). Positive bf16 numbers read as int16 keep their order, negative
    ones read as negative int16: every bf16 x above ``values`` has bits above these, so an
    integer comparison (a fast one) keeps them all, and at most the numbers in between."""
    rounded = values.to(torch.bfloat16)
    bits = rounded.view(torch.int16).clone()
    bits -= (rounded.float() > values).to(torch.int16)
    return bits


def _bf16_product_threshold(lowered: torch.Tensor) -> torch.Tensor:
    """The int16 bits that the bits of a bf16 product's result exceed whenever the product,
    before its rounding, is above ``lowered`` (positive): the result is then at or above the
    largest bf16 at or below ``lowered`` (rounding keeps the order), so its bits are above
    that one's (``_bf16_bits_below``) less 1."""
    return _bf16_bits_below(lowered) - 1


# a coarse block whose passing share of scores exceeds this is scored in float32 whole: one
# entry's sparse product costs about as much as 8 dense ones
COARSE_SHARE = 1 / 16


def _rescore(queries, columns, floor, topk: int, line, c, q_cell, key):
    """Float32 affinities of one block's coarse candidates, by a sampled product (no
    gathered copies); those above the floor, at most the best ``topk`` of a line.

    queries : ``n x U x Q x C``, the block's tiles (a view of the held queries)
    columns : ``C x padded`` key cells (``sampled_product``'s layout)
    floor : ``n x U x Q``
    line, c, q_cell, key : the candidates' line of scores (``(c U + u) Q + q``), tile,
        query cell and padded key position, in the order of their lines

    Returns ``(c, u, q_cell, key, value)`` of the entries kept.
    """
    n, count, cells, channels = queries.shape
    if queries.stride(-1) != 1 or any(s % channels for s in queries.stride()[:-1]):
        queries = queries.contiguous()
    stride = [s // channels for s in queries.stride()[:-1]]
    matrix = queries.as_strided((1 + sum((m - 1) * s for m, s in zip(queries.shape[:-1], stride)), channels),
                                (channels, 1))
    u = (line // cells) % count
    rows = c * stride[0] + u * stride[1] + q_cell * stride[2]
    position = rows * columns.shape[1] + key
    found = [c, u, q_cell, key, rows]
    if len(position) > 1 and not bool((position[1:] >= position[:-1]).all()):
        order = torch.argsort(position)
        found, line = [x.index_select(0, order) for x in found], line.index_select(0, order)
    values = sampled_product(matrix, columns, found[4], found[3])
    keep = (values > floor.reshape(-1).take(line)).nonzero().squeeze(1)
    found = [x.index_select(0, keep) for x in found[:4] + [values]]
    best = _best_entries(line.index_select(0, keep), found[4], n * count * cells, topk)
    return found if best is None else [x.index_select(0, best) for x in found]


def sampled_product(rows: torch.Tensor, columns: torch.Tensor, line: torch.Tensor, col: torch.Tensor):
    """The entries ``(line[i], col[i])`` of ``rows @ columns`` (``n x C`` and ``C x m``) and
    no others: ``torch.sparse.sampled_addmm`` over a CSR pattern (no gathered copies of
    the vectors). ``line`` sorted, ``col`` sorted within a line. Returns ``len(line)``.
    ``columns`` is best the transpose of a contiguous ``m x C`` (else it is copied so)."""
    _consume_csr_warning()
    starts = torch.zeros(len(rows) + 1, dtype=torch.long, device=line.device)
    starts[1:] = torch.cumsum(torch.bincount(line, minlength=len(rows)), 0)
    pattern = torch.sparse_csr_tensor(starts, col, rows.new_zeros(len(line)), size=(len(rows), columns.shape[1]),
                                      check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, rows, columns, beta=0.0).values()


@functools.cache
def _consume_csr_warning() -> None:
    """torch warns once per process that CSR tensors are in beta, at the first one made:
    make that one here, with the warning silenced (the pattern is internal)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        torch.sparse_csr_tensor(torch.tensor([0, 0]), torch.zeros(0, dtype=torch.long), torch.zeros(0), size=(1, 1),
                                check_invariants=True)


def _best_entries(line, values, lines: int, k: int):
    """Positions of the entries of ``values`` to keep: all of a line's (``line``, sorted,
    of ``lines``) when it has at most k, else its k best; None when all are kept."""
    counts = torch.bincount(line, minlength=lines)
    if not len(line) or int(counts.max()) <= k:
        return None
    starts = torch.cumsum(counts, 0) - counts                 # a line's first entry
    crowded = (counts > k).nonzero().squeeze(1)
    width = int(counts.max())
    slots = starts.take(crowded)[:, None] + torch.arange(width, device=line.device)      # crowded x width
    inside = torch.arange(width, device=line.device) < counts.take(crowded)[:, None]
    dense = values.take(slots.clamp(max=len(values) - 1)).masked_fill(~inside, -math.inf)
    best = slots.gather(1, dense.topk(k, dim=-1).indices).reshape(-1)
    return torch.cat([(counts.take(line) <= k).nonzero().squeeze(1), best])


def _above_floor(scores, tiles: Tiles, row: int, span: slice, floor, k: int):
    """``(col, user, query cell, window cell, value)`` of the valid entries of ``scores``
    (``n x U x Q x R``) above ``floor`` (``n x U x Q``); a row with more than k such
    entries gives its radius-restricted top-k instead. (Indexing by ``take`` and
    ``index_select`` on flat positions: boolean masks cost several times more.)"""
    n, count, cells, size = scores.shape
    flat = scores.view(-1)
    above, line, r, c, q_cell = _valid_above(scores, tiles, row, span, floor)
    counts = torch.bincount(line, minlength=n * count * cells)
    if not counts.numel() or int(counts.max()) <= k:
        return [c, (line // cells) % count, q_cell, r, flat.take(above)]
    few = (counts.take(line) <= k).nonzero().squeeze(1)
    found = [x.index_select(0, few) for x in (c, (line // cells) % count, q_cell, r, above)]
    found[4] = flat.take(found[4])
    many = (counts > k).nonzero().squeeze(1)
    lines = scores.view(-1, size).index_select(0, many)
    m_c, m_q = many // (count * cells), many % cells
    lines += tiles.bias[row][span.start + m_c, m_q]
    values, m_r = lines.topk(k, dim=-1)
    more = [m_c[:, None].expand(-1, k), ((many // cells) % count)[:, None].expand(-1, k),
            m_q[:, None].expand(-1, k), m_r, values]
    return [torch.cat([a, b.reshape(-1)]) for a, b in zip(found, more)]


def _valid_above(scores, tiles: Tiles, row: int, span: slice, floor, length: int | None = None):
    """``(flat position, line, window cell, col, query cell)`` of the entries of ``scores``
    (``n x U x Q x R'``: the R window cells, then any padding that never passes) above
    ``floor`` (``n x U x Q``) that lie within the radius and on the frame; ``line`` is the
    row of scores, ``(c U + u) Q + q``. ``length``: the segment (default
    ``_segment_length``)."""
    n, count, cells, size = scores.shape
    length = length or _segment_length(size)
    above = _entries_above(scores.view(-1, length), floor.reshape(-1), size // length)
    line = above // size
    r = above - line * size
    c, q_cell = line // (count * cells), line % cells
    window = tiles.valid[row].shape[-1]
    valid = tiles.valid[row].view(-1).take(((span.start + c) * cells + q_cell) * window + r)
    keep = valid.nonzero().squeeze(1)
    return tuple(x.index_select(0, keep) for x in (above, line, r, c, q_cell))


def _segment_length(size: int) -> int:
    """The segment of a row of ``size`` scores whose maxima ``_entries_above`` takes: the
    smallest divisor of ``size`` of at least 100 (a maximum over fewer contiguous floats
    is several times slower per float on CPU), else the whole row."""
    return next((d for d in range(100, size // 2 + 1) if size % d == 0), size)


def _entries_above(segments: torch.Tensor, floor: torch.Tensor, per_row: int, maxima=None) -> torch.Tensor:
    """Flat positions (sorted) of the entries of ``segments`` (``rows * per_row x L``, each
    row of scores cut into ``per_row`` segments) above their row's ``floor`` (``rows``).
    Only the segments whose maximum passes are searched entry by entry: a row-wide
    comparison and ``nonzero`` cost several times more than one maximum per segment.
    ``maxima``: the segments' maxima when already taken (``rows x per_row``)."""
    length = segments.shape[1]
    maxima = segments.amax(dim=-1) if maxima is None else maxima
    hits = (maxima.view(-1, per_row) > floor[:, None]).view(-1).nonzero().squeeze(1)
    passed = _gather_rows(segments, hits) > floor.index_select(0, hits // per_row)[:, None]
    where = passed.view(-1).nonzero().squeeze(1)
    return hits.index_select(0, where // length) * length + where % length


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, index)`` for a 2-D ``x``; a contiguous ``x`` whose rows are whole
    64-bit words is copied as such (segments of 64 int16 or int32 scores: 2-3x faster)."""
    if not x.is_contiguous() or x.shape[1] * x.element_size() % 8:
        return x.index_select(0, index)
    return x.view(torch.int64).index_select(0, index).view(x.dtype)


def rounding_margin(channels: int, dtype=torch.float32) -> float:
    """A bound on how far two float computations of one affinity of unit features (in any
    summation order) can differ: each is within ``channels * eps / 2`` of the exact dot
    product (|a||b| <= 1), doubled for safety. A floor lowered by it admits every entry
    that another kernel's product puts at or above the floor."""
    return 2.0 * channels * torch.finfo(dtype).eps


class NearFloor:
    """A floor for each query cell of a frame before any full product: its k-th best
    affinity among the keys of a few recent key frames within a small radius of where its
    content is expected, a lower bound of its final k-th best (these keys are candidates
    too). Where the camera pans, the keys around the query's own cell are the wrong ones
    (stroller: about half of the final entries lie 4-11 cells away), so each key frame's
    small window is moved by the global motion between the frames (a ``shift``; ``floor``
    measures the motion to the latest frame, the caller chains it from frame to frame).
    Speed only: any window gives a valid floor.

    tiles : the ``Tiles`` of the full radius R (the padding of its key maps bounds the moves)
    radius : the small radius r (in cells); windows move by at most ``reach`` = ``tiles.m -
        m`` cells along each axis, and keep the keys within r of the moved centre, within R
        of the query and on the frame
    slots : the most frames a call gets (the near frames, a run of consecutive ones)

    One product per tile row covers all the frames: their windows are gathered from
    channels-last key maps (``key_map``: a window row is one contiguous run) into one key
    block, frame s in slot ``s % slots``, kept from call to call: a frame's windows are
    gathered again only when its shift changed (a still camera: once; ``gathered`` counts
    them). A 0 / -inf bias keeps the keys (one ``Q x R`` part per shift, made once, plus the
    window rows and columns off the frame, and the slots of no frame).
    """

    def __init__(self, tiles: Tiles, radius: float, slots: int):
        self.tiles, self.radius, self.slots = tiles, radius, slots
        self._block, self._held = None, [None] * slots          # the key block, each slot's (frame, shift)
        self.gathered = 0
        self.m = radius_offsets(radius, (tiles.h, tiles.w))
        self.reach = tiles.m - self.m
        self.side = tiles.tile + 2 * self.m
        self.offset = window_offsets(tiles.tile, self.m, tiles.grid_index.device)     # Q x R: dy, dx
        self._bias: dict[tuple[int, int], torch.Tensor] = {}

    def clamp(self, shift) -> tuple[int, int]:
        """The nearest whole shift that the key maps' padding allows."""
        return tuple(max(-self.reach, min(self.reach, int(round(d)))) for d in shift)

    def bias(self, shift: tuple[int, int], dtype=torch.float32) -> torch.Tensor:
        """``Q x R``: 0 for the window cells within r of the moved centre and R of the
        query, -inf for the others (made once per shift)."""
        if shift not in self._bias:
            dy, dx = self.offset
            near = dy**2 + dx**2 < self.radius**2
            full = (dy + shift[0]) ** 2 + (dx + shift[1]) ** 2 < self.tiles.radius**2
            self._bias[shift] = torch.zeros(dy.shape, dtype=dtype, device=dy.device).masked_fill_(
                ~(near & full), -math.inf)
        return self._bias[shift]

    @staticmethod
    def key_map(padded: torch.Tensor) -> torch.Tensor:
        """A key map ``C x`` the full radius' padding (``Tiles.pad_keys``) as ``floor`` reads it:
        channels last, so that a window row is one contiguous run."""
        return padded.permute(1, 2, 0).contiguous()

    def _off_frame(self, start: torch.Tensor, size: int, dtype) -> torch.Tensor:
        """``N x side``: 0 where a window's row (or column) lies on the grid's ``size`` cells
        along that axis, -inf off it; ``start`` (``N``) the grid position of each window's first."""
        zero = torch.zeros((len(start), self.side), dtype=dtype, device=start.device)
        return zero.masked_fill_(~on_axis(start, self.side, size), -math.inf)

    @torch.no_grad()
    def floor(self, queries: torch.Tensor, frames: list, topk: int):
        """The floor of each query cell from the keys of ``frames``, each ``(s, key map,
        shift)`` (frame index s, distinct modulo ``slots``; ``key_map``; ``shift`` ``(dy, dx)``
        cells, key minus query, ``clamp``ed; the same s and shift must come with the same
        map), and the global motion to the last frame's keys: its shift plus the most common
        offset, within the window, of the queries' best keys there (queries on the grid; the
        shift alone where no query has a key there).

        queries : ``rows x cols x Q x C`` (one frame, ``Tiles.arrange``)

        Returns ``(floor, motion)``: ``Nq`` (tile order; -1, the least cosine, which prunes
        nothing, where the frames hold fewer than k keys for a query) and ``(dy, dx)``.
        """
        rows, cols, cells, channels = queries.shape
        tiles, side, slots = self.tiles, self.side, self.slots
        size, span = side * side, 2 * self.m + 1
        if len(frames) * size < topk:
            return queries.new_full((rows * cols * cells,), -1.0), frames[-1][2]
        shape = (rows, cols, slots, side, side, channels)
        if self._block is None or self._block.shape != shape or self._block.dtype != queries.dtype:
            self._block, self._held = queries.new_zeros(shape), [None] * slots       # (a slot of no frame: 0, masked)
        by_slot = {s % slots: (s, key_map, shift) for s, key_map, shift in frames}
        stale = [(slot, key_map, shift) for slot, (s, key_map, shift) in by_slot.items()
                 if self._held[slot] != (s, shift)]
        for slot, _, _ in stale:                      # (until gathered: a stopped call leaves them stale)
            self._held[slot] = None
        no_keys = torch.full((cells, size), -math.inf, dtype=queries.dtype, device=queries.device)
        within = torch.cat([self.bias(by_slot[i][2], queries.dtype) if i in by_slot else no_keys
                            for i in range(slots)], dim=-1)                                   # Q x slots R
        starts = torch.arange(cols, device=queries.device) * tiles.tile - self.m
        dxs = [by_slot[i][2][1] if i in by_slot else 0 for i in range(slots)]
        columns = torch.cat([self._off_frame(starts + dx, tiles.w, queries.dtype).repeat(1, side) for dx in dxs],
                            dim=-1)[:, None]                                                 # cols x 1 x slots R
        dys = torch.tensor([by_slot[i][2][0] if i in by_slot else 0 for i in range(slots)], device=queries.device)
        on_grid = tiles.on_grid.view(rows, cols, cells)
        width = cols * tiles.tile + 2 * self.m
        last = frames[-1][0] % slots

        def row_floor(row):
            keys = self._block[row]                                                  # cols x slots x side x side x C
            for slot, key_map, (dy, dx) in stale:
                y0, x0 = self.reach + dy + row * tiles.tile, self.reach + dx
                strip = key_map[y0: y0 + side, x0: x0 + width]                      # side x width x C
                keys[:, slot] = strip.unfold(1, side, tiles.tile).permute(1, 0, 3, 2)   # cols x side x side x C
            lines = self._off_frame(row * tiles.tile - self.m + dys, tiles.h, queries.dtype)   # slots x side
            scores = torch.bmm(queries[row], keys.view(cols, slots * size, channels).transpose(1, 2))
            scores.add_(within + lines[:, :, None].expand(slots, side, side).reshape(-1)).add_(columns)
            bound = scores.topk(topk, dim=-1).values[..., -1].reshape(-1)
            value, best = scores[..., last * size: (last + 1) * size].max(dim=-1)     # cols x Q
            best += torch.arange(cells, device=scores.device) * size
            bins = (self.offset[0].take(best) + self.m) * span + self.offset[1].take(best) + self.m
            return bound, torch.bincount(bins[on_grid[row] & (value > -math.inf)], minlength=span * span)

        parts = parallel_map(row_floor, range(rows), queries.device)
        for slot, (s, _, shift) in by_slot.items():
            self._held[slot] = (s, shift)
        self.gathered += len(stale)
        bound = torch.cat([p[0] for p in parts])
        counts, shift = sum(p[1] for p in parts), frames[-1][2]
        if not int(counts.sum()):                      # no query with a key there: nothing measured
            return bound.clamp(min=-1.0), shift
        mode = int(counts.argmax())
        return bound.clamp(min=-1.0), (shift[0] + mode // span - self.m, shift[1] + mode % span - self.m)


@torch.no_grad()
def first_frame_topk(queries: torch.Tensor, first_keys: torch.Tensor, topk: int, segment: int | None = None,
                     chunk: int = 128):
    """Top-k affinities of queries ``Nq x C`` over all cells of one frame (``hw x C``,
    row-major): ``(values, cells)`` each ``Nq x k``.

    segment : when given (a divisor of hw, e.g. the grid's width), each row of affinities is
        cut into segments of that many cells and the top-k is taken among the k segments
        with the largest maxima only: every entry of a row's top-k lies in one of them
        (each better segment holds an entry above it), so the result is the same, ties
        aside, for a fraction of a full-row top-k's cost.
    chunk : query rows at a time (speed only: a block that stays in cache)
    """
    cells = first_keys.shape[0]
    k = min(topk, cells)
    parts = segment is not None and cells % segment == 0 and 2 * k * segment <= cells

    def top(start):
        scores = queries[start:start + chunk] @ first_keys.t()
        if not parts:
            return scores.topk(k, dim=-1)
        scores = scores.view(scores.shape[0], -1, segment)
        best = scores.amax(dim=-1).topk(k, dim=-1).indices                         # n x k segments
        picked = torch.gather(scores, 1, best[..., None].expand(-1, -1, segment))  # n x k x segment
        v, i = picked.view(scores.shape[0], -1).topk(k, dim=-1)
        return v, best.gather(1, i // segment) * segment + i % segment

    values, index = zip(*parallel_map(top, range(0, queries.shape[0], chunk), queries.device))
    return torch.cat(values), torch.cat(index)


# keys per segment of a bf16 search: a whole number of 512-bit vectors of int16, whose maxima
# torch takes several times faster than over other lengths (measured: 0.14 ns an entry, 0.43 at 107)
BF16_SEGMENT = 64

# the rounding of a bf16 product's result (float32 sums rounded to bfloat16): at most half a
# unit in the last place, 2^-8 for |value| < 2 (cosines of unit features)
BF16_OUTPUT_ERROR = 2.0**-8


def bf16_copy(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` rounded to bfloat16, and the norms of the rounding error ``|bf16(x) - x|`` of
    its vectors along ``dim`` (float32; about 2^-9 |x|, at most 2^-8 |x|)."""
    low = x.to(torch.bfloat16)
    return low, (low.to(x.dtype) - x).norm(dim=dim)


def int8_copy(x: torch.Tensor, dim: int = -1, per_vector: bool = True):
    """``x`` as int8 ``round(s x)``, with ``s = 127 / max |x|`` of each vector along ``dim``
    (or one ``s`` for all of ``x``: ``per_vector=False``), so that ``round(s x) / s`` is
    within ``1 / (2 s)`` of ``x`` in each component. Returns ``(int8 copy, |round(s x) / s - x|
    of each vector (float32), s)``; ``s`` has ``x``'s shape less ``dim`` (a 0-d tensor for
    one), float64, 1 for zero vectors. The products of two copies are exact integers (int32
    sums, ``torch._int_mm``): ``round(s q).round(t k) / (s t)``."""
    top = (x.abs().amax(dim=dim) if per_vector else x.abs().max()).double()
    scale = 127 / torch.where(top > 0, top, torch.ones_like(top))
    spread = scale.unsqueeze(dim) if per_vector else scale
    exact = x.double()
    low = torch.round(exact * spread)
    copy = low.to(torch.int8)
    return copy, low.div_(spread).sub_(exact).norm(dim=dim).float(), scale     # (low / s - x, in place)


def rounded_product_error(query_rounding: torch.Tensor, key_rounding, channels: int) -> torch.Tensor:
    """A bound on ``|q~.k~ - q.k|`` for vectors q, k of norm <= 1 and their rounded copies q~,
    k~ (``bf16_copy``, ``int8_copy`` scaled back), before a bf16 product's result is rounded
    (``BF16_OUTPUT_ERROR``): ``q~.k~ - q.k = (q~ - q).k~ + q.(k~ - k)``, so (Cauchy-Schwarz)
    it is at most ``|q~ - q| (1 + |k~ - k|) + |k~ - k|``; the float32 sums inside a bf16
    product add less than ``rounding_margin`` (products of bf16 numbers are exact in float32;
    int8 sums are exact).

    query_rounding : ``|q~ - q|`` of each query, any shape
    key_rounding : ``|k~ - k|``, the largest over the keys (a number or 0-d tensor)
    Returns ``query_rounding``'s shape: for unit features about 0.005 in bf16 (the worst case
    of any unit vectors, every component rounded by 2^-8: 0.008), 0.03 in int8."""
    return query_rounding * (1 + key_rounding) + key_rounding + rounding_margin(channels)


def bf16_is_faster(device) -> bool:
    """Whether a bfloat16 matrix product runs at least twice as fast as a float32 one here
    (CPUs with native bf16 dot products; measured once, on CPU only)."""
    return torch.device(device).type == "cpu" and _cpu_bf16_is_faster()


def int8_is_faster(device) -> bool:
    """Whether an int8 matrix product (``torch._int_mm``: VNNI dot products) runs at least 1.25
    times as fast as a bf16 one where bf16 is native (``bf16_is_faster``; measured once, on
    CPU only; 1.4-3x on an AVX-512 VNNI CPU, measured at frame 0's shape)."""
    return bf16_is_faster(device) and _cpu_int8_is_faster()


@functools.cache
def _cpu_int8_is_faster() -> bool:
    # a block of frame 0's search: 256 queries, a frame's keys; the fastest of 10 calls each
    # (the first calls of a shape, and fresh pages for its result, cost more)
    a, b = torch.ones(256, 96, dtype=torch.int8), torch.ones(96, 6400, dtype=torch.int8)
    x, y = a.bfloat16(), b.bfloat16()
    seconds = []
    for product in (lambda: x @ y, lambda: torch._int_mm(a, b)):
        product()
        calls = []
        for _ in range(10):
            start = time.perf_counter()
            product()
            calls.append(time.perf_counter() - start)
        seconds.append(min(calls))
    return seconds[1] < seconds[0] / 1.25


@functools.cache
def _cpu_bf16_is_faster() -> bool:
    a, b = torch.full((256, 96), 0.5), torch.full((96, 2048), 0.25)      # (the global RNG left alone)
    seconds = []
    for x, y in ((a, b), (a.bfloat16(), b.bfloat16())):
        x @ y
        start = time.perf_counter()
        for _ in range(4):
            x @ y
        seconds.append(time.perf_counter() - start)
    return seconds[1] < 0.5 * seconds[0]


def cluster_order(keys: torch.Tensor, clusters: int, iterations: int = 8) -> torch.Tensor:
    """A permutation of the rows of ``keys`` (``n x C``) that lists them cluster by cluster:
    spherical k-means (cosine assignment, normalized means), started from ``clusters``
    evenly spaced rows, so the same keys always give the same order. Returns ``n`` indices."""
    centres = keys[torch.linspace(0, len(keys) - 1, clusters, device=keys.device).long()]
    for _ in range(iterations):
        assign = (keys @ centres.t()).argmax(dim=1)
        centres = F.normalize(torch.zeros_like(centres).index_add_(0, assign, keys), dim=1)
    return torch.argsort((keys @ centres.t()).argmax(dim=1), stable=True)


class FrameSearch:
    """The top-k affinities of query rows above their floors among all cells of one key
    frame (CRW's frame 0, met by every later frame), exact, with float32 products for a
    fraction of the pairs. The key frame is prepared once:

    - its cells are ordered by ``cluster_order`` into ``segments`` clusters and cut into
      ``segments`` equal segments (``segments`` divides hw: the grid's height), so that a
      segment holds similar keys; with ``coarse="bf16"`` or ``"int8"`` into segments of
      ``BF16_SEGMENT`` keys instead, the last one padded with zero keys (maxima over 64
      int16 run several times faster than over other lengths);
    - a coarse product gives, for each query and segment, an upper bound of its best
      affinity there. ``coarse="low-rank"``: with B the top ``rank`` right singular
      vectors of the key frame's features (``C x rank``) and q', k' the parts of q and k
      outside their span, q.k = (qB).(kB) + q'.k' <=
      [qB, |q'|] . [kB, |k'|] (Cauchy-Schwarz), one product of ``rank + 1`` channels.
      ``coarse="bf16"``: a bfloat16 product plus its error (``rounded_product_error``; unit
      features; for CPUs with native bf16 products), whose k best segment maxima less the
      error also raise the floor. ``coarse="int8"``: the same with an int8 product
      (``int8_copy``: a scale per query, one for the keys; exact int32 sums, a looser
      bound, for CPUs whose int8 products are faster still: ``int8_is_faster``).

    ``above(queries, floor, topk)`` then scores in float32 only the segments whose bound
    exceeds the floor, for the queries that need them (low-rank), or only the entries
    whose bf16 or int8 affinity does (bf16, int8).

    keys : ``hw x C`` unit features of the key frame (row-major cells)
    chunk : query rows per block of the coarse product (speed only: small blocks spread
        evenly over the threads, and their scores stay in cache); default 64 (low-rank),
        256 (bf16, int8)
    """

    def __init__(self, keys: torch.Tensor, segments: int, coarse: str = "low-rank", rank: int = 16,
                 chunk: int | None = None):
        if coarse not in ("low-rank", "bf16", "int8"):
            raise ValueError(f"coarse must be 'low-rank', 'bf16' or 'int8', got {coarse!r}")
        cells, channels = keys.shape
        if coarse != "low-rank":
            segments = -(-cells // BF16_SEGMENT)
        self.segments, self.segment, self.coarse = segments, -(-cells // segments), coarse
        self.chunk = chunk or (64 if coarse == "low-rank" else 256)
        self.order = cluster_order(keys, segments)                  # sorted position -> cell
        self.keys = keys.index_select(0, self.order)
        if coarse != "low-rank":
            padded = F.pad(self.keys, (0, 0, 0, segments * self.segment - cells))   # zero keys: affinity 0
            if coarse == "bf16":
                low_keys, rounding = bf16_copy(padded)
            else:                                    # one scale for all keys: the products compare as integers
                low_keys, rounding, self.key_scale = int8_copy(padded, per_vector=False)
            self.low_keys, self.key_rounding = low_keys.t().contiguous(), rounding.max()
        else:
            self.basis = torch.linalg.svd(self.keys, full_matrices=False).Vh[:min(rank, channels)].t()   # C x r
            self.low_keys = self._low_rank(self.keys).t().contiguous()
            self.error = 4 * rounding_margin(channels)                # the bound's own float32 rounding

    def _low_rank(self, rows: torch.Tensor) -> torch.Tensor:
        """``n x C`` -> ``n x (r + 1)``: ``[x B, |x - x B B^T|]``."""
        inside = rows @ self.basis
        return torch.cat([inside, (rows - inside @ self.basis.t()).norm(dim=1, keepdim=True)], dim=1)

    @torch.no_grad()
    def above(self, queries: torch.Tensor, floor: torch.Tensor, topk: int):
        """``(values, cells)``, each ``Nq x k``: the top-k affinities of each query (``Nq x C``)
        among those above its ``floor`` (``Nq``, finite), in no particular order, -inf where
        fewer than k pass; the same entries as ``first_frame_topk`` above the floor, ties
        aside."""
        count = queries.shape[0]
        k = min(topk, len(self.keys))
        if self.coarse != "low-rank":
            return self._above_by_entries(queries, floor, k)
        low = self._low_rank(queries)

        def maxima(start):
            scores = low[start:start + self.chunk] @ self.low_keys
            return scores.view(scores.shape[0], self.segments, self.segment).amax(dim=-1)

        best = torch.cat(parallel_map(maxima, range(0, count, self.chunk), queries.device))
        seg, query = (best.t() > (floor - self.error)[None]).nonzero(as_tuple=True)   # sorted by segment
        sizes = torch.bincount(seg, minlength=self.segments).tolist()
        blocks = self.keys.view(self.segments, self.segment, -1)

        def rescore(item):
            s, rows = item
            scores = queries.index_select(0, rows) @ blocks[s].t()
            i, j = (scores > floor.index_select(0, rows)[:, None]).nonzero(as_tuple=True)
            return rows.index_select(0, i), scores[i, j], self.order[j + s * self.segment]

        work = [(s, rows) for s, rows in enumerate(query.split(sizes)) if len(rows)]
        found = parallel_map(rescore, work, queries.device)
        if found:
            query, values, index = (torch.cat(x) for x in zip(*found))
        else:
            query = index = torch.zeros(0, dtype=torch.long, device=queries.device)
            values = queries.new_zeros(0)
        return _best_per_row(query, values, index, count, k)

    def _above_by_entries(self, queries: torch.Tensor, floor: torch.Tensor, k: int):
        """``above`` with a bf16 or int8 product: per block of query rows, the entries whose
        coarse affinity passes ``floor`` less its error (``rounded_product_error``; segment maxima
        first, as ``_entries_above``), scored again in float32 by ``sampled_product``; the k
        best segment maxima, less the error (and for bf16 ``BF16_OUTPUT_ERROR``), raise the
        floor first (k entries that large exist)."""
        _consume_csr_warning()
        if self.coarse == "bf16":
            low, rounding = bf16_copy(queries)
        else:
            low, rounding, scale = int8_copy(queries)
            scale = scale * self.key_scale            # an int32 score / scale = the product of the copies
        error = rounded_product_error(rounding, self.key_rounding, queries.shape[1])
        cells = self.segments * self.segment                  # the keys, then the padding's zero keys

        def block(start):
            rows = slice(start, start + self.chunk)
            if self.coarse == "bf16":
                scores, lowered = low[rows] @ self.low_keys, floor[rows] - error[rows]
                # positive floors: the bf16 bits read as int16 keep the order (``_bf16_bits_below``),
                # and the padding's zero keys never pass; else floats, the padding at -inf
                bits = bool((lowered > 0).all())
                scores = scores.view(torch.int16) if bits else scores.float()
                if not bits:
                    scores[:, len(self.keys):] = -math.inf
            else:                                     # exact integer sums: no rounding of the result
                scores = torch._int_mm(low[rows], self.low_keys)
                scores[:, len(self.keys):] = torch.iinfo(torch.int32).min
            best = scores.view(len(scores), self.segments, self.segment).amax(dim=-1)
            raised = floor[rows]
            if k <= self.segments:
                # only rows where k segment maxima pass their floor (a few) need the k-th best
                if self.coarse == "int8":
                    maxima, margin = best.double().div_(scale[rows, None]).float(), error[rows]
                else:
                    maxima = best.view(torch.bfloat16).float().masked_fill(best < 0, -math.inf) if bits else best
                    margin = error[rows] + BF16_OUTPUT_ERROR
                some = ((maxima > (raised + margin)[:, None]).sum(dim=-1) >= k).nonzero().squeeze(1)
                if len(some):
                    kth = maxima.index_select(0, some).topk(k, dim=-1).values[:, -1] - margin.index_select(0, some)
                    raised = raised.index_put((some,), torch.maximum(raised.index_select(0, some), kth))
            # an entry above ``raised`` has a coarse product above ``lowered``: in bf16 bits above
            # ``_bf16_product_threshold``, as floats above ``lowered`` less the output's rounding;
            # in int8 an integer above ``lowered`` times the scales, so above its floor less 1
            lowered = raised - error[rows]
            if self.coarse == "int8":
                limit = (lowered.double() * scale[rows]).floor_() - 1
                threshold = limit.clamp_(-2**31, 2**31 - 1).to(torch.int32)
            else:
                threshold = _bf16_product_threshold(lowered) if bits else lowered - BF16_OUTPUT_ERROR
            flat = _entries_above(scores.view(-1, self.segment), threshold, self.segments, best)
            line, cell = flat // cells, flat % cells
            values = sampled_product(queries[rows], self.keys.t(), line, cell)
            keep = (values > raised.index_select(0, line)).nonzero().squeeze(1)
            return _best_per_row(line.index_select(0, keep), values.index_select(0, keep),
                                 self.order.index_select(0, cell.index_select(0, keep)), len(scores), k)

        values, index = zip(*parallel_map(block, range(0, len(queries), self.chunk), queries.device))
        return torch.cat(values), torch.cat(index)


def _best_per_row(query, values, index, rows: int, k: int):
    """Sparse ``(query, value, index)`` -> dense ``rows x k``: each row's best k entries (-inf
    / 0 where it has fewer)."""
    counts = torch.bincount(query, minlength=rows)
    few = counts.take(query) <= k
    top_values, top_index = scatter_rows(query[few], values[few], index[few], rows, k)
    crowded = (counts > k).nonzero().squeeze(1)
    if len(crowded):                              # more than k: their best k
        slot = torch.zeros(rows, dtype=torch.long, device=query.device)
        slot[crowded] = torch.arange(len(crowded), device=query.device)
        many = ~few
        crowd_values, crowd_index = scatter_rows(slot[query[many]], values[many], index[many], len(crowded))
        crowd_values, pick = crowd_values.topk(k, dim=-1)
        top_values[crowded], top_index[crowded] = crowd_values, crowd_index.gather(1, pick)
    return top_values, top_index


def scatter_rows(query, values, index, rows: int, width: int | None = None):
    """Sparse ``(query, value, index)`` -> dense ``rows x width`` (-inf / 0 where empty)."""
    counts = torch.bincount(query, minlength=rows)
    width = width or max(1, int(counts.max()) if len(query) else 1)
    order = torch.argsort(query)
    query, values, index = (x.index_select(0, order) for x in (query, values, index))   # (~3x faster than x[order])
    slot = torch.arange(len(query), device=query.device) - (torch.cumsum(counts, 0) - counts).index_select(0, query)
    dense_values = values.new_full((rows, width), -math.inf)
    dense_index = torch.zeros(rows, width, dtype=torch.long, device=query.device)
    dense_values[query, slot] = values
    dense_index[query, slot] = index
    return dense_values, dense_index
