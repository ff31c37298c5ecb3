r"""The FeatureMapICON objective: log P[Phi^AB(Phi^BA(x)) = x], exact, in O(N) memory.

Four independent draws of the equivariant augmentation give four feature maps,
``a1, a3`` of frame A (``B x C x HA x WA``, N_A = HA * WA pixels indexed by i) and
``b2, b4`` of frame B (``B x C x HB x WB``, N_B pixels indexed by j). Per sample

    L = mean_i log sum_j softmax_j(a1_i . b2_j) * softmax_i(a3_i . b4_j),

the log-probability that a pixel of A, sent to B by the row-stochastic soft map of
draws (1, 2) and back by the column-stochastic map of draws (3, 4), comes home.
L <= 0, and L = 0 for a perfect (learn-nothing) positional code. Training minimizes
``-log_p(...).mean()``.

The O(N)-memory form
--------------------
Write S1_ij = a1_i . b2_j and S2_ij = a3_i . b4_j, LSE for log-sum-exp. Then

    r_i = LSE_j S1_ij                              (row normalizer of the A -> B map)
    c_j = LSE_i S2_ij                              (column normalizer of the B -> A map)
    t_i = LSE_j (S1_ij + S2_ij - c_j)
        = LSE_j ([a1_i, a3_i] . [b2_j, b4_j] - c_j)  (the product, one dot product)
    L   = mean_i (t_i - r_i),

because softmax_j(S1)_ij * softmax_i(S2)_ij = exp(S1_ij - r_i + S2_ij - c_j). All three
are log-sum-exp reductions over an implicit N_A x N_B matrix, computed by one custom
autograd function in strips of ``block_cols`` of B's pixels, with a running maximum
per row of A as flash attention does. A strip holds every row, so c_j for its columns
is exact within the strip, and r_i, t_i accumulate across strips; with
``block_rows < N_A`` each strip is further cut into row chunks (then c needs one more
pass over the chunks). No N_A x N_B matrix larger than one tile
(``B x block_rows x block_cols``) ever exists, in forward or backward.

Backward recomputes each tile from the saved r, t and c. With the row softmax
P_ij = exp(S1_ij - r_i), the column softmax Q_ij = exp(S2_ij - c_j), the normalized
product W_ij = exp(S1_ij + S2_ij - c_j - t_i) and g_i the gradient of the loss with
respect to pixel i's term t_i - r_i:

    dL/dS1_ij = g_i (W_ij - P_ij)
    dL/dS2_ij = g_i W_ij - Q_ij sum_i' g_i' W_i'j     (the second part through c_j)
    dL/da1 = dS1 b2,  dL/db2 = dS1^T a1,  dL/da3 = dS2 b4,  dL/db4 = dS2^T a3.

The column sum in dS2 is exact within a strip, so one pass suffices when a strip is one
chunk. Cost: 2 matrix products of size N_A x N_B x C forward, 6 backward, and 3 + 3
exponentials per matrix entry (the dense form needs 2 + 4 products and 2 exponentials,
but holds five N_A x N_B matrices and makes as many passes over them). Memory is
O(B (N_A + N_B) C + B * block_rows * block_cols). (Three separate reductions, one
autograd function each, would cost 16 products instead of 8.)

Performance: ``fmapicon bench loss`` (measured numbers: ``docs/experiments.md``). On a CPU
shared with other busy processes, OpenMP's default spin-waiting at the end of every
parallel kernel can make this many-kernel computation several times slower;
``OMP_WAIT_POLICY=PASSIVE`` in the environment before torch loads avoids it.

Why float32
-----------
With unit features scaled by lambda = 12 the logits reach lambda^2 = 144; in bfloat16
(8 bits of mantissa) a logit near 144 is off by up to 0.5, which changes a probability
by a factor up to e^0.5. The reductions therefore run in float32 (float64 when an input
is float64), also under ``torch.autocast``: the inputs are cast up and autocast is off
inside; gradients flow back to the inputs in their own dtype.

Why eps
-------
A pixel with no counterpart (occluded, out of view) has a cycle probability near 0, so
its log can be -50 or worse and its gradient dominates the batch. The original code
computes log(sum + 1e-4), which floors such a pixel's term at log(1e-4) ~ -9.2 and
flattens its gradient. ``eps`` offers that: each pixel's term becomes
log(exp(t_i - r_i) + eps), computed stably as logaddexp(t_i - r_i, log eps). eps = 0
is the exact objective (the tests' setting); training uses the original's 1e-4.

(The original code sums over A's pixels inside the log and averages over B's; that is
this formula with the frames' roles exchanged, ``log_p(b4, a3, b2, a1)``, equal in
distribution since the pair order and the draws are exchangeable.)

``log_p_dense`` is the plain quadratic form (softmax, product, sum, log), kept as the
reference for tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch.autograd.function import once_differentiable


# Tile budget (elements of one B x rows x cols tile) and the range of strip widths.
# CPU: a 1 Mi-element tile (4 MB in float32) stays in cache; wider strips were slower
# (docs/experiments.md). GPU: larger tiles, fewer kernel launches (about 1.3 GB of tiles
# at B = 64, N = 14,400).
_CPU_TILE = (1 << 20, 32, 512)
_GPU_TILE = (1 << 26, 16, 4096)
_MIN_BLOCK_ROWS = 16
_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)

__all__ = ["log_p", "log_p_shuffled", "log_p_dense", "default_blocks"]


# ---------------------------------------------------------------------------------------
# the public objective


def log_p(a1, b2, a3, b4, *, eps: float = 0.0, block_rows: int | None = None,
          block_cols: int | None = None, check: bool = True) -> torch.Tensor:
    """Exact FeatureMapICON objective per sample, in memory linear in the pixel counts.

    Parameters
    ----------
    a1, a3 : ``B x C x HA x WA`` feature maps of frame A (draws 1 and 3).
    b2, b4 : ``B x C x HB x WB`` feature maps of frame B (draws 2 and 4).
    eps : float >= 0
        Added to each pixel's cycle probability inside the log (0: exact objective;
        the original code uses 1e-4).
    block_rows, block_cols : int, optional
        Tile size: rows (A's pixels) x columns (B's pixels) of the implicit similarity
        matrix. Default: chosen per device and shape by ``default_blocks``.
    check : bool
        Scan the inputs for NaN and infinity (a ``ValueError`` naming the map). The scan reads
        every value once (and waits for the device); the trainer, which checks its features
        and loss itself, turns it off.
    Returns
    -------
    ``(B,)`` tensor, float32 (float64 when an input is float64), also under autocast:
    ``mean_i log(sum_j softmax_j(a1_i . b2_j) softmax_i(a3_i . b4_j) + eps)``.
    Differentiable (once) in all four inputs.
    """
    dtype = _check_inputs(a1, b2, a3, b4, finite=check)
    _check_eps(eps)
    _check_block(block_rows, "block_rows")
    _check_block(block_cols, "block_cols")
    batch, n_a, n_b = a1.shape[0], a1.shape[2] * a1.shape[3], b2.shape[2] * b2.shape[3]
    default_rows, default_cols = default_blocks(a1.device, batch, n_a, n_b)
    blocks = (min(block_rows or default_rows, n_a), min(block_cols or default_cols, n_b))
    with _autocast_off(a1.device.type):
        pixels = [_pixels(x, dtype) for x in (a1, b2, a3, b4)]
        log_cycle = _LogCycle.apply(*pixels, *blocks)  # B x N_A
        return _pixel_terms(log_cycle, eps).mean(dim=1)


def log_p_shuffled(a1, b2, a3, b4, *, check: bool = True) -> torch.Tensor:
    """The positional-code diagnostic: exact ``log_p`` (eps = 0) with each A paired with the
    next sample's B (b2, b4 rolled by one along the batch: another video).

    A positional code scores as well here as on the true pairs. Content features score
    lower, though not down to chance (-log N_B): another video's B still works as a code
    book that sends a distinctive pixel of A home (measured: ``docs/experiments.md``).
    ``check`` as in ``log_p``. ``(B,)`` tensor; needs B >= 2 (``ValueError``).
    """
    if len(a1) < 2:
        raise ValueError(f"log_p_shuffled needs at least 2 pairs in the batch, got {len(a1)}")
    return log_p(a1, b2.roll(1, 0), a3, b4.roll(1, 0), check=check)


def log_p_dense(a1, b2, a3, b4, *, eps: float = 0.0) -> torch.Tensor:
    """The quadratic reference: the formula of ``log_p`` written out with softmaxes.

    Builds ``B x N_A x N_B`` matrices (0.83 GB each per sample at N = 14,400 in
    float32); for tests and benchmarks only. Same arguments and result as ``log_p``;
    computes in float32 (float64 when an input is float64).
    """
    dtype = _check_inputs(a1, b2, a3, b4)
    _check_eps(eps)
    a1, b2, a3, b4 = (_pixels(x, dtype) for x in (a1, b2, a3, b4))
    a_to_b = torch.softmax(a1 @ b2.transpose(1, 2), dim=2)  # softmax over j, B's pixels
    b_to_a = torch.softmax(a3 @ b4.transpose(1, 2), dim=1)  # softmax over i, A's pixels
    cycle = (a_to_b * b_to_a).sum(dim=2)  # P[x -> B -> x] for each pixel i of A
    return torch.log(cycle + eps).mean(dim=1)


def default_blocks(device, batch: int, n_a: int, n_b: int) -> tuple[int, int]:
    """Default tile (block_rows, block_cols) for ``batch`` samples of N_A x N_B pixels.

    A strip keeps all N_A rows (one pass, no recomputation) and as many of B's pixels
    as fit the device's budget of ``batch * block_rows * block_cols`` elements, between
    a minimum width (long matrix products stay efficient) and a maximum (measured: no
    gain beyond). When even the minimum width would not fit, rows are chunked, so the
    memory stays bounded for any batch and pixel count.
    """
    budget, min_cols, max_cols = _CPU_TILE if torch.device(device).type == "cpu" else _GPU_TILE
    block_cols = min(max_cols, max(min_cols, budget // (batch * n_a)))
    block_rows = min(n_a, max(_MIN_BLOCK_ROWS, budget // (batch * block_cols)))
    return block_rows, min(block_cols, n_b)


def _pixel_terms(log_cycle, eps: float):
    """Each pixel's log(P + eps) from log P, without leaving log space."""
    if eps == 0:
        return log_cycle
    return torch.logaddexp(log_cycle, log_cycle.new_tensor(math.log(eps)))


# ---------------------------------------------------------------------------------------
# the tiled computation and its backward


class _LogCycle(torch.autograd.Function):
    """Per-pixel log cycle probability t_i - r_i (``B x N_A``) from ``B x N x C`` pixels.

    Inside, scores are in base 2: a1 and a3 are scaled by log2(e) once, so that every
    tile comes out of its matrix product ready for exp2, which torch's CPU kernels
    compute about twice as fast as exp; r, t and c are kept in base 2 too.
    """

    @staticmethod
    def forward(ctx, a1, b2, a3, b4, block_rows, block_cols):
        with _autocast_off(a1.device.type):
            a1, a3 = a1 * _LOG2E, a3 * _LOG2E
            r, t, c = _cycle_forward(a1, b2, a3, b4, block_rows, block_cols)
        ctx.save_for_backward(a1, b2, a3, b4, r, t, c)
        ctx.blocks = (block_rows, block_cols)
        return (t - r) * _LN2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a1, b2, a3, b4, r, t, c = ctx.saved_tensors
        grads = [torch.zeros_like(x) if need else None
                 for x, need in zip((a1, b2, a3, b4), ctx.needs_input_grad)]
        strip = _Strip((a1, b2, a3, b4), (r, t, c), grad.to(r.dtype), grads)
        block_rows, block_cols = ctx.blocks
        with _autocast_off(a1.device.type):
            for cols in _blocks(b2.shape[1], block_cols):
                strip.backward(cols, _blocks(a1.shape[1], block_rows))
        for db in grads[1::2]:  # db2, db4 were accumulated from the base-2 a1, a3
            if db is not None:
                db.mul_(_LN2)
        return (*grads, None, None)


def _cycle_forward(a1, b2, a3, b4, block_rows, block_cols):
    """r, t (``B x N_A``) and c (``B x N_B``), strip by strip of B's pixels (base 2)."""
    batch, n_a, n_b = a1.shape[0], a1.shape[1], b2.shape[1]
    rt = _RunningLSE(a1.new_full((2, batch, n_a), -math.inf))  # r and t, stacked
    c = a1.new_empty(batch, n_b)
    chunks = _blocks(n_a, block_rows)
    for cols in _blocks(n_b, block_cols):
        s2_whole = _column_lse(a3, b4[:, cols], chunks, out=c[:, cols])
        c_cols = c[:, cols].unsqueeze(1)
        for rows in chunks:
            s2 = s2_whole if s2_whole is not None else _scores(a3[:, rows], b4[:, cols])
            # one 2 x B x rows x cols tile [S1, S1 + S2 - c], so that r and t share the
            # reduction's passes (fewer, larger operations)
            tile = a1.new_empty((2, *s2.shape))
            _scores(a1[:, rows], b2[:, cols], out=tile[0])
            torch.add(tile[0], s2.sub_(c_cols), out=tile[1])
            rt.add(tile, dim=3, index=(slice(None), slice(None), rows))
    r, t = rt.result()
    return r, t, c


def _column_lse(a3, b4_cols, chunks, out):
    """Write c_j = LSE_i a3_i . b4_j for a strip of columns into ``out`` (``B x cols``).

    Returns the strip's score tile S2 when the strip is a single chunk (kept for the
    product), else None (the caller recomputes it chunk by chunk).
    """
    c = _RunningLSE(out.new_full(out.shape, -math.inf))
    s2_whole = None
    if len(chunks) == 1:
        s2_whole = _scores(a3, b4_cols)
        c.add(s2_whole, dim=1, consume=False)
    else:
        for rows in chunks:
            c.add(_scores(a3[:, rows], b4_cols), dim=1)
    out.copy_(c.result())
    return s2_whole


class _RunningLSE:
    """Online log-sum-exp (base 2) along one axis of a stream of tiles: a running max
    and a sum rescaled whenever the max grows (the flash-attention recurrence)."""

    def __init__(self, start_max):
        self.max = start_max  # -inf: nothing seen yet
        self.sum = torch.zeros_like(start_max)

    def add(self, tile, dim, index=(...,), consume=True):
        """Fold ``tile`` (overwritten when ``consume``), reduced along ``dim``, into
        the entries ``[index]``."""
        old_max = self.max[index]
        new_max = torch.maximum(old_max, tile.amax(dim=dim))
        self.sum[index] *= torch.exp2(old_max - new_max)
        shifted = tile.sub_(new_max.unsqueeze(dim)) if consume else tile - new_max.unsqueeze(dim)
        self.sum[index] += _exp2_(shifted).sum(dim=dim)
        self.max[index] = new_max

    def result(self):
        return self.max + self.sum.log2()


class _Strip:
    """Backward over one strip of B's pixels: recompute the tiles, accumulate gradients."""

    def __init__(self, inputs, stats, grad, grads):
        self.a1, self.b2, self.a3, self.b4 = inputs  # a1, a3 in base 2
        r, t, self.c = stats  # base 2
        self.shift = torch.stack([r, t]).unsqueeze(3)  # 2 x B x N_A x 1
        self.grad = grad.unsqueeze(2)  # g_i = dL / d(t_i - r_i): B x N_A x 1
        self.grads = grads  # da1, db2, da3, db4 (None where not needed), accumulated in place

    def backward(self, cols, chunks):
        whole = len(chunks) == 1
        b2, b4, c = self.b2[:, cols], self.b4[:, cols], self.c[:, cols].unsqueeze(1)
        column_weight = c.new_zeros(c.shape)  # sum_i g_i W_ij: B x 1 x cols
        for rows in chunks:
            # exponents of [P, W, Q] in one 3 x B x rows x cols tile:
            # [S1 - r, S1 + S2 - c - t, S2 - c]
            tile = b2.new_empty((3, b2.shape[0], rows.stop - rows.start, b2.shape[1]))
            p, w, q = tile
            _scores(self.a1[:, rows], b2, out=p)
            _scores(self.a3[:, rows], b4, out=q).sub_(c)
            torch.add(p, q, out=w)
            tile[:2].sub_(self.shift[:, :, rows])
            _exp2_(tile if whole else tile[:2])
            g = self.grad[:, rows]
            gw = w.mul_(g)  # g_i W_ij
            d1 = torch.addcmul(gw, p, g, value=-1)  # dS1 = g (W - P)
            column_weight += gw.sum(dim=1, keepdim=True)
            # dS2 = gW - Q * column_weight; the second part needs the whole column
            d2 = torch.addcmul(gw, q, column_weight, value=-1) if whole else gw
            self._accumulate(rows, cols, d1, d2)
        if not whole:
            for rows in chunks:
                q = _exp2_(_scores(self.a3[:, rows], b4).sub_(c))  # column softmax Q
                self._accumulate(rows, cols, None, q.mul_(column_weight).neg_())

    def _accumulate(self, rows, cols, d1, d2):
        """dL/da1 += dS1 b2, dL/db2 += dS1^T a1 (and the same for a3, b4 with dS2)."""
        da1, db2, da3, db4 = self.grads
        if d1 is not None and da1 is not None:
            da1[:, rows].baddbmm_(d1, self.b2[:, cols])
        if d1 is not None and db2 is not None:
            db2[:, cols].baddbmm_(d1.transpose(1, 2), self.a1[:, rows])
        if da3 is not None:
            da3[:, rows].baddbmm_(d2, self.b4[:, cols])
        if db4 is not None:
            db4[:, cols].baddbmm_(d2.transpose(1, 2), self.a3[:, rows])


def _scores(x_rows, y_cols, out=None):
    """One tile of dot products ``x_rows y_cols^T``: ``B x rows x cols``."""
    return torch.bmm(x_rows, y_cols.transpose(1, 2), out=out)


def _exp2_(shifted):
    """In-place 2**x of max-shifted scores (all <= 0), floored just above underflow.

    torch's CPU exp and exp2 leave their vectorized path for inputs whose result
    underflows (below about -126 for exp2 in float32) and run many times slower there;
    such inputs are common (logits span +-144). Each floored term adds at most
    2**(log2(tiny) + 1) to a sum that is >= 1 (or to a gradient weight), far below the
    dtype's resolution.
    """
    floor = math.log2(torch.finfo(shifted.dtype).tiny) + 1.0
    return shifted.clamp_(min=floor).exp2_()


def _blocks(length: int, size: int):
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


# ---------------------------------------------------------------------------------------
# inputs


def _pixels(feature_map, dtype):
    """``B x C x H x W`` -> ``B x (H W) x C`` in the accumulation dtype, contiguous."""
    return feature_map.flatten(2).transpose(1, 2).to(dtype).contiguous()


def _autocast_off(device_type: str):
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type without autocast: nothing to turn off
        return contextlib.nullcontext()


_NAMES = ("a1", "b2", "a3", "b4")


def _check_inputs(a1, b2, a3, b4, finite: bool = True) -> torch.dtype:
    """Validate the four feature maps (their values too, when ``finite``); return the accumulation dtype."""
    maps = dict(zip(_NAMES, (a1, b2, a3, b4)))
    for name, x in maps.items():
        _check_one(name, x)
    _check_same(a1, a3, "a1", "a3", "both come from frame A: B x C x HA x WA")
    _check_same(b2, b4, "b2", "b4", "both come from frame B: B x C x HB x WB")
    if a1.shape[:2] != b2.shape[:2]:
        raise ValueError(f"a1 and b2 must have the same batch size and channel count (B x C), "
                        f"got {tuple(a1.shape[:2])} and {tuple(b2.shape[:2])}")
    devices = {str(x.device) for x in maps.values()}
    if len(devices) > 1:
        raise ValueError(f"a1, b2, a3, b4 must be on one device, got {sorted(devices)}; move them with .to(device)")
    for name, x in maps.items() if finite else ():
        if not bool(torch.isfinite(x).all()):
            nan, inf = int(x.isnan().sum()), int(x.isinf().sum())
            raise ValueError(f"{name} must be finite, got {nan} NaN and {inf} infinite values of {x.numel()}; "
                            "check the network's output (a diverged run, a division by a zero norm)")
    wide = any(x.dtype == torch.float64 for x in maps.values())
    return torch.float64 if wide else torch.float32


def _check_one(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor feature map B x C x H x W, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a feature map B x C x H x W (4 dims), got {x.dim()} dims "
                        f"with shape {tuple(x.shape)}; add the batch dimension with x[None] if it is missing")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} must have at least one sample, channel and pixel, got shape {tuple(x.shape)}")


def _check_same(x, y, name_x, name_y, why):
    if x.shape != y.shape:
        raise ValueError(f"{name_x} and {name_y} must have the same shape ({why}), "
                        f"got {tuple(x.shape)} and {tuple(y.shape)}")


def _check_eps(eps):
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0 (0: exact; the original uses 1e-4), got {eps!r}")


def _check_block(size, name):
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"{name} must be a positive int or None (automatic), got {size!r}")
