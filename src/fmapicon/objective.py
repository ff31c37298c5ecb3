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

because softmax_j(S1)_ij * softmax_i(S2)_ij = exp(S1_ij - r_i + S2_ij - c_j). All
three are one reduction, ``row_logsumexp(q, k, bias)_i = LSE_j (q_i . k_j + bias_j)``
(c is the row reduction of the transposed problem, q = b4, k = a3), computed by a
custom autograd function over ``block_rows x block_cols`` tiles with a running
maximum, as flash attention does: no N_A x N_B matrix larger than one tile ever
exists, in forward or backward. Backward recomputes each tile and, with the saved
LSE, the row softmax p_ij = exp(q_i . k_j + bias_j - LSE_i):

    dLSE_i / dq_i = sum_j p_ij k_j,   d(sum_i g_i LSE_i) / dk_j = sum_i g_i p_ij q_i,
    d(sum_i g_i LSE_i) / dbias_j = sum_i g_i p_ij.

The gradient into c (through t's bias -c) flows back through c's own reduction by
ordinary autograd. Memory is O(B (N_A + N_B) C + B * block_rows * block_cols).

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

from fmapicon.errors import UserError

# Tile sizes, measured with `fmapicon bench loss` on a 2-core AVX-512 CPU: tiles of
# 2-4 Mi elements keep the Python loop short and the tile in the last-level cache;
# bigger tiles were no faster. On a GPU larger tiles mean fewer kernel launches.
_CPU_BLOCK_COLS = 1024
_CPU_TILE_ELEMENTS = 1 << 21
_GPU_BLOCK_COLS = 4096
_GPU_TILE_ELEMENTS = 1 << 26
_MIN_BLOCK_ROWS = 16

__all__ = ["log_p", "log_p_dense", "row_logsumexp", "default_blocks"]


# ---------------------------------------------------------------------------------------
# the public objective


def log_p(a1, b2, a3, b4, *, eps: float = 0.0, block_rows: int | None = None,
          block_cols: int | None = None) -> torch.Tensor:
    """Exact FeatureMapICON objective per sample, in memory linear in the pixel counts.

    Parameters
    ----------
    a1, a3 : ``B x C x HA x WA`` feature maps of frame A (draws 1 and 3).
    b2, b4 : ``B x C x HB x WB`` feature maps of frame B (draws 2 and 4).
    eps : float >= 0
        Added to each pixel's cycle probability inside the log (0: exact objective;
        the original code uses 1e-4).
    block_rows, block_cols : int, optional
        Tile size of the three log-sum-exp reductions (rows x columns of the implicit
        similarity matrix). Default: chosen per device and shape (``default_blocks``).

    Returns
    -------
    ``(B,)`` tensor, float32 (float64 when an input is float64), also under autocast:
    ``mean_i log(sum_j softmax_j(a1_i . b2_j) softmax_i(a3_i . b4_j) + eps)``.
    """
    dtype = _check_inputs(a1, b2, a3, b4)
    _check_eps(eps)
    _check_block(block_rows, "block_rows")
    _check_block(block_cols, "block_cols")
    blocks = {"block_rows": block_rows, "block_cols": block_cols}
    with _autocast_off(a1.device.type):
        a1, b2, a3, b4 = (_pixels(x, dtype) for x in (a1, b2, a3, b4))
        r = row_logsumexp(a1, b2, **blocks)
        c = row_logsumexp(b4, a3, **blocks)
        t = row_logsumexp(torch.cat([a1, a3], 2), torch.cat([b2, b4], 2), -c, **blocks)
        return _pixel_terms(t - r, eps).mean(1)


def log_p_dense(a1, b2, a3, b4, *, eps: float = 0.0) -> torch.Tensor:
    """The quadratic reference: the formula of ``log_p`` written out with softmaxes.

    Builds the two ``B x N_A x N_B`` softmax matrices (0.83 GB each per sample at
    N = 14,400 in float32); for tests and benchmarks only. Same arguments and result
    as ``log_p``; computes in float32 (float64 when an input is float64).
    """
    dtype = _check_inputs(a1, b2, a3, b4)
    _check_eps(eps)
    a1, b2, a3, b4 = (_pixels(x, dtype) for x in (a1, b2, a3, b4))
    a_to_b = torch.softmax(a1 @ b2.transpose(1, 2), dim=2)  # softmax over j, B's pixels
    b_to_a = torch.softmax(a3 @ b4.transpose(1, 2), dim=1)  # softmax over i, A's pixels
    cycle = (a_to_b * b_to_a).sum(dim=2)  # P[x -> B -> x] for each pixel i of A
    return torch.log(cycle + eps).mean(dim=1)


def row_logsumexp(q, k, bias=None, *, block_rows: int | None = None,
                  block_cols: int | None = None) -> torch.Tensor:
    """``LSE_j (q_i . k_j + bias_j)`` for every row i, tiled, with a recomputing backward.

    Parameters
    ----------
    q : ``B x N x D``;  k : ``B x M x D``;  bias : ``B x M`` or None (same dtype).
    block_rows, block_cols : tile size; default ``default_blocks(...)``.

    Returns
    -------
    ``B x N``. Never holds more than one ``B x block_rows x block_cols`` tile of
    scores. Differentiable once in q, k and bias.
    """
    default_rows, default_cols = default_blocks(q.device, q.shape[0], q.shape[1], k.shape[1])
    block_rows = block_rows or default_rows
    block_cols = block_cols or default_cols
    return _RowLogSumExp.apply(q, k, bias, block_rows, block_cols)


def default_blocks(device, batch: int, rows: int, cols: int) -> tuple[int, int]:
    """Tile size (block_rows, block_cols) for a ``batch x rows x cols`` reduction.

    Columns first (long rows make few, large matrix products), then as many rows as
    fit the device's tile budget (``batch * block_rows * block_cols`` elements), so
    that the memory is bounded whatever the batch or pixel count.
    """
    is_cpu = torch.device(device).type == "cpu"
    block_cols = min(cols, _CPU_BLOCK_COLS if is_cpu else _GPU_BLOCK_COLS)
    budget = _CPU_TILE_ELEMENTS if is_cpu else _GPU_TILE_ELEMENTS
    block_rows = max(_MIN_BLOCK_ROWS, budget // (batch * block_cols))
    return min(rows, block_rows), block_cols


def _pixel_terms(log_cycle, eps: float):
    """Each pixel's log(P + eps) from log P, without leaving log space."""
    if eps == 0:
        return log_cycle
    return torch.logaddexp(log_cycle, log_cycle.new_tensor(math.log(eps)))


# ---------------------------------------------------------------------------------------
# the tiled reduction and its backward


class _RowLogSumExp(torch.autograd.Function):
    """LSE_j (q_i . k_j + bias_j) over tiles; backward recomputes the tiles."""

    @staticmethod
    def forward(ctx, q, k, bias, block_rows, block_cols):
        with _autocast_off(q.device.type):
            lse = _lse_forward(q, k, bias, block_rows, block_cols)
        ctx.save_for_backward(q, k, bias, lse)
        ctx.blocks = (block_rows, block_cols)
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, bias, lse = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        with _autocast_off(q.device.type):
            grads = _lse_backward(q, k, bias, lse, grad.to(lse.dtype), *ctx.blocks, needs)
        return (*grads, None, None)


def _scores(q_rows, k_cols, bias_cols):
    """One tile ``q_rows k_cols^T + bias_cols``: ``B x rows x cols``."""
    if bias_cols is None:
        return torch.bmm(q_rows, k_cols.transpose(1, 2))
    return torch.baddbmm(bias_cols.unsqueeze(1), q_rows, k_cols.transpose(1, 2))


def _blocks(length: int, size: int):
    return [slice(start, min(start + size, length)) for start in range(0, length, size)]


def _lse_forward(q, k, bias, block_rows, block_cols):
    lse = q.new_empty(q.shape[:2])
    for rows in _blocks(q.shape[1], block_rows):
        lse[:, rows] = _lse_of_rows(q[:, rows], k, bias, block_cols)
    return lse


def _lse_of_rows(q_rows, k, bias, block_cols):
    """Online log-sum-exp along the columns: a running max and a rescaled running sum."""
    running_max = running_sum = None
    for cols in _blocks(k.shape[1], block_cols):
        tile = _scores(q_rows, k[:, cols], None if bias is None else bias[:, cols])
        new_max = tile.amax(dim=2)
        if running_max is not None:
            new_max = torch.maximum(new_max, running_max)
            # earlier columns were summed relative to the old max: rescale them
            running_sum = running_sum.mul_(torch.exp(running_max - new_max))
        tile_sum = tile.sub_(new_max.unsqueeze(2)).exp_().sum(dim=2)
        running_sum = tile_sum if running_sum is None else running_sum.add_(tile_sum)
        running_max = new_max
    return running_max + running_sum.log()


def _lse_backward(q, k, bias, lse, grad, block_rows, block_cols, needs):
    """Gradients of sum_i grad_i LSE_i, accumulated tile by tile from g_i p_ij."""
    dq = torch.zeros_like(q) if needs[0] else None
    dk = torch.zeros_like(k) if needs[1] else None
    dbias = torch.zeros_like(bias) if bias is not None and needs[2] else None
    for rows in _blocks(q.shape[1], block_rows):
        q_rows = q[:, rows]
        shift, weight = lse[:, rows].unsqueeze(2), grad[:, rows].unsqueeze(2)
        for cols in _blocks(k.shape[1], block_cols):
            tile = _scores(q_rows, k[:, cols], None if bias is None else bias[:, cols])
            weighted_p = tile.sub_(shift).exp_().mul_(weight)  # g_i p_ij
            if dq is not None:
                dq[:, rows].baddbmm_(weighted_p, k[:, cols])
            if dk is not None:
                dk[:, cols].baddbmm_(weighted_p.transpose(1, 2), q_rows)
            if dbias is not None:
                dbias[:, cols] += weighted_p.sum(dim=1)
    return dq, dk, dbias


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


def _check_inputs(a1, b2, a3, b4) -> torch.dtype:
    """Validate the four feature maps; return the accumulation dtype."""
    maps = dict(zip(_NAMES, (a1, b2, a3, b4)))
    for name, x in maps.items():
        _check_one(name, x)
    _check_same(a1, a3, "a1", "a3", "both come from frame A: B x C x HA x WA")
    _check_same(b2, b4, "b2", "b4", "both come from frame B: B x C x HB x WB")
    if a1.shape[:2] != b2.shape[:2]:
        raise UserError(f"a1 and b2 must have the same batch size and channel count (B x C), "
                        f"got {tuple(a1.shape[:2])} and {tuple(b2.shape[:2])}")
    devices = {str(x.device) for x in maps.values()}
    if len(devices) > 1:
        raise UserError(f"a1, b2, a3, b4 must be on one device, got {sorted(devices)}; move them with .to(device)")
    for name, x in maps.items():
        if not bool(torch.isfinite(x).all()):
            raise UserError(f"{name} has non-finite values (NaN or inf); expected finite features. "
                            "Check the network's output (a diverged run, a division by a zero norm).")
    wide = any(x.dtype == torch.float64 for x in maps.values())
    return torch.float64 if wide else torch.float32


def _check_one(name, x):
    if not isinstance(x, torch.Tensor):
        raise UserError(f"{name} must be a torch.Tensor feature map B x C x H x W, got {type(x).__name__}")
    if x.dim() != 4:
        raise UserError(f"{name} must be a feature map B x C x H x W (4 dims), got {x.dim()} dims "
                        f"with shape {tuple(x.shape)}; add the batch dimension with x[None] if it is missing")
    if not x.is_floating_point():
        raise UserError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {x.dtype}")
    if x.numel() == 0:
        raise UserError(f"{name} must have at least one sample, channel and pixel, got shape {tuple(x.shape)}")


def _check_same(x, y, name_x, name_y, why):
    if x.shape != y.shape:
        raise UserError(f"{name_x} and {name_y} must have the same shape ({why}), "
                        f"got {tuple(x.shape)} and {tuple(y.shape)}")


def _check_eps(eps):
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise UserError(f"eps must be a finite number >= 0 (0: exact; the original uses 1e-4), got {eps!r}")


def _check_block(size, name):
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise UserError(f"{name} must be a positive int or None (automatic), got {size!r}")
