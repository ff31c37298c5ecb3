"""The FeatureMapICON objective: the tiled O(N) form against the dense reference, known
answers (a perfect positional code, uninformative features), precision (float32,
bfloat16 autocast, logits up to lambda^2 = 144), eps, input checks, and a bound on the
largest tensor the tiled form ever creates."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from fmapicon.core import objective
from fmapicon.errors import UserError
from fmapicon.core.objective import default_blocks, log_p, log_p_dense, log_p_shuffled

LAMBDA = 12.0  # NormScale's initial lambda: unit features times 12, logits up to 144


def unit_features(batch, channels, height, width, *, scale=LAMBDA, dtype=torch.float64, seed=0):
    """``B x C x H x W`` random unit vectors times ``scale``, as NormScale outputs them."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, height, width, generator=generator, dtype=dtype)
    return (x / x.norm(dim=1, keepdim=True) * scale).requires_grad_()


def four_maps(batch, channels, size_a, size_b, **kwargs):
    seed = kwargs.pop("seed", 0)
    return [unit_features(batch, channels, *(size_a if k % 2 == 0 else size_b), seed=seed + k, **kwargs)
            for k in range(4)]


def value_and_grads(form, maps, **kwargs):
    value = form(*maps, **kwargs)
    # weight the samples differently so that a gradient routed to the wrong sample shows
    weights = torch.arange(1, value.shape[0] + 1, dtype=value.dtype)
    return value.detach(), torch.autograd.grad((value * weights).sum(), maps)


def assert_matches_dense(maps, atol, rtol=0.0, eps=0.0, **blocks):
    value, grads = value_and_grads(log_p, maps, eps=eps, **blocks)
    value_ref, grads_ref = value_and_grads(log_p_dense, [m.detach().double().requires_grad_() for m in maps],
                                           eps=eps)
    torch.testing.assert_close(value.double(), value_ref, atol=atol, rtol=rtol)
    for name, g, g_ref in zip(("a1", "b2", "a3", "b4"), grads, grads_ref):
        torch.testing.assert_close(g.double(), g_ref, atol=atol, rtol=rtol, msg=lambda m: f"d/d{name}: {m}")


# (batch, channels, A's H x W, B's H x W, block_rows, block_cols): default tiles; one strip
# of all rows with a ragged last strip; row chunks (the multi-pass path) with ragged last
# chunk and strip; one-element tiles; a single pixel in A; N_A > N_B and N_A < N_B.
SHAPES = [
    (2, 8, (5, 7), (4, 6), None, None),
    (2, 8, (5, 7), (4, 6), None, 5),
    (3, 16, (6, 6), (9, 5), 8, 7),
    (2, 4, (3, 4), (2, 3), 1, 1),
    (1, 4, (1, 1), (3, 3), None, 2),
    (2, 32, (12, 10), (7, 9), 50, 16),
]


@pytest.mark.parametrize("batch, channels, size_a, size_b, block_rows, block_cols", SHAPES)
def test_value_and_gradients_match_dense_in_float64(batch, channels, size_a, size_b, block_rows, block_cols):
    maps = four_maps(batch, channels, size_a, size_b)
    assert_matches_dense(maps, atol=1e-9, block_rows=block_rows, block_cols=block_cols)


def test_logits_up_to_lambda_squared_do_not_overflow():
    # b2, b4 copy a1, a3 up to a small perturbation: the best logits sit at 144
    a1, a3 = unit_features(2, 16, 6, 6, seed=1), unit_features(2, 16, 6, 6, seed=2)
    b2 = (a1.detach() + 0.3 * unit_features(2, 16, 6, 6, scale=1.0, seed=3).detach()).requires_grad_()
    b4 = (a3.detach() + 0.3 * unit_features(2, 16, 6, 6, scale=1.0, seed=4).detach()).requires_grad_()
    maps = [a1, b2, a3, b4]
    largest = torch.einsum("bci,bcj->bij", a1.flatten(2), b2.flatten(2)).max().item()
    assert largest > 140
    assert_matches_dense(maps, atol=1e-9, block_rows=10, block_cols=7)
    value32 = log_p(*[m.detach().float() for m in maps], block_rows=10, block_cols=7)
    assert torch.isfinite(value32).all()
    torch.testing.assert_close(value32.double(), log_p_dense(*maps).detach(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("eps", [1e-4, 0.3])
def test_eps_matches_dense_with_eps(eps):
    maps = four_maps(2, 8, (5, 6), (6, 4), seed=7)
    assert_matches_dense(maps, atol=1e-9, eps=eps, block_rows=7, block_cols=5)


def positional_code(height, width):
    """``1 x (H W) x H x W``: each pixel's feature is its own one-hot vector times lambda."""
    n = height * width
    return torch.eye(n, dtype=torch.float64).reshape(1, n, height, width) * LAMBDA


def test_eps_floors_a_pixel_that_never_comes_home_at_log_eps():
    # A -> B sends pixel i to i; B -> A sends j to the next pixel: no pixel comes home.
    # Two paths carry e^-144 each (i -> i -> not i, i -> pi^-1(i) -> i): log P = ln 2 - 144
    code = positional_code(4, 5)
    shifted = code.roll(1, dims=1)  # the same codes, each on another pixel
    maps = [code, code, code, shifted]
    assert log_p(*maps).item() == pytest.approx(math.log(2) - LAMBDA**2, abs=1e-6)
    floored = log_p(*maps, eps=1e-4, block_cols=3).item()
    assert floored == pytest.approx(math.log(1e-4), abs=1e-9)  # about -9.21
    assert log_p_dense(*maps, eps=1e-4).item() == pytest.approx(floored, abs=1e-9)


def test_float32_stays_exact_where_the_dense_form_underflows():
    # the pixels that never come home (above): P = 2 e^-144, far below float32's range;
    # the dense form's float32 log is -inf, the tiled form stays in log space
    code = positional_code(4, 5).float()
    maps = [code, code, code, code.roll(1, dims=1)]
    assert log_p_dense(*maps).item() == -math.inf
    assert log_p(*maps, block_cols=6).item() == pytest.approx(math.log(2) - LAMBDA**2, abs=1e-4)


def test_perfect_positional_code_scores_zero():
    # every pixel's feature is its own one-hot code times 12, the same in all four maps
    # (attempt 0 of the writeup: learn nothing, score perfectly)
    maps = [positional_code(4, 5) for _ in range(4)]
    value = log_p(*maps, block_rows=6, block_cols=7)
    assert value.item() == pytest.approx(0.0, abs=1e-9)
    assert log_p_dense(*maps).item() == pytest.approx(0.0, abs=1e-9)


def test_uninformative_features_score_minus_log_n():
    # features near zero: both softmaxes are uniform, sum_j (1/N_B)(1/N_A) = 1/N_A
    maps = four_maps(2, 16, (10, 12), (7, 9), scale=1e-3)
    value = log_p(*maps, block_cols=13)
    torch.testing.assert_close(value.detach(), torch.full((2,), -math.log(120), dtype=torch.float64),
                               atol=1e-4, rtol=0)


def test_random_features_score_about_minus_log_n():
    # random unit features at a small scale: about -log N_A, slightly above
    maps = four_maps(2, 32, (16, 16), (16, 16), scale=1.0)
    value = log_p(*maps).detach()
    assert torch.all(value > -math.log(256) - 0.1) and torch.all(value < -math.log(256) + 0.5)


def test_float32_result_is_close_to_float64():
    maps = four_maps(2, 64, (12, 12), (10, 11), seed=3)
    value, grads = value_and_grads(log_p, [m.detach().float().requires_grad_() for m in maps], block_cols=24)
    value_ref, grads_ref = value_and_grads(log_p, maps)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), value_ref, atol=2e-4, rtol=0)
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), g_ref, atol=1e-5, rtol=1e-3)


def test_bfloat16_autocast_on_cpu_computes_in_float32():
    maps = [m.detach().float() for m in four_maps(2, 32, (8, 8), (8, 8), seed=9)]
    reference = log_p_dense(*[m.double() for m in maps])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = log_p(*maps)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), reference, atol=1e-4, rtol=0)


def test_bfloat16_inputs_give_float32_result_and_bfloat16_gradients():
    maps = [m.detach().bfloat16().requires_grad_() for m in four_maps(1, 16, (6, 6), (5, 7), seed=4)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = log_p(*maps)
    value.sum().backward()
    reference = log_p_dense(*[m.detach().double() for m in maps])
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double().detach(), reference, atol=1e-4, rtol=0)
    assert all(m.grad.dtype == torch.bfloat16 and torch.isfinite(m.grad.float()).all() for m in maps)


def test_gradcheck_on_a_tiny_case():
    maps = four_maps(2, 3, (2, 3), (2, 2), scale=2.0)
    assert torch.autograd.gradcheck(lambda *m: log_p(*m, block_rows=2, block_cols=3), maps)
    assert torch.autograd.gradcheck(lambda *m: log_p(*m, eps=0.05, block_cols=1), maps)


def test_only_some_inputs_need_gradients():
    maps = four_maps(1, 8, (4, 5), (5, 4), seed=2)
    frozen = [maps[0], maps[1].detach(), maps[2].detach(), maps[3]]
    grads = torch.autograd.grad(log_p(*frozen, block_cols=3).sum(), [frozen[0], frozen[3]])
    grads_ref = torch.autograd.grad(log_p_dense(*frozen).sum(), [frozen[0], frozen[3]])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-9, rtol=0)


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Record the largest tensor any aten operation creates (forward and backward)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("block_rows, block_cols", [(None, 8), (64, 16)])
def test_no_tensor_larger_than_a_tile_is_ever_created(block_rows, block_cols):
    channels, side = 4, 16  # N = 256: a dense matrix has 256 x 256 entries
    maps = four_maps(1, channels, (side, side), (side, side), dtype=torch.float32)
    n = side * side
    rows = block_rows or n
    with _LargestTensor() as mode:
        log_p(*maps, block_rows=block_rows, block_cols=block_cols).sum().backward()
    # backward stacks three tiles (the exponents of P, W and Q); inputs are N x C
    bound = max(3 * rows * block_cols, n * channels)
    assert mode.largest <= bound < n * n // 8
    with _LargestTensor() as dense_mode:
        log_p_dense(*maps).sum().backward()
    assert dense_mode.largest >= n * n


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("batch, n_a, n_b", [(1, 14400, 14400), (64, 14400, 14400), (2, 4096, 1024),
                                             (1, 10, 7), (1024, 100_000, 50)])
def test_default_blocks_bound_the_tile(device, batch, n_a, n_b):
    rows, cols = default_blocks(device, batch, n_a, n_b)
    assert 1 <= rows <= n_a and 1 <= cols <= n_b
    budget, min_cols, _ = objective._CPU_TILE if device == "cpu" else objective._GPU_TILE
    assert batch * rows * cols <= max(budget, batch * objective._MIN_BLOCK_ROWS * min_cols)


@pytest.mark.parametrize("change, message", [
    (lambda m: [m[0][0], *m[1:]], "4 dims"),
    (lambda m: [m[0], m[1][:1], m[2], m[3][:1]], "batch size"),
    (lambda m: [m[0], m[1][:, :3], m[2], m[3][:, :3]], "channel"),
    (lambda m: [m[0], m[1], m[2][:, :, :2], m[3]], "a1 and a3 must have the same shape"),
    (lambda m: [m[0], m[1], m[2], m[3][:, :, :, :2]], "b2 and b4 must have the same shape"),
    (lambda m: [m[0], torch.full_like(m[1], math.nan), m[2], m[3]], "must be finite"),
    (lambda m: [m[0], m[1], m[2].index_fill(3, torch.tensor([0]), math.inf), m[3]], "must be finite"),
    (lambda m: [m[0].long(), *m[1:]], "floating-point"),
    (lambda m: [m[0].numpy(), *m[1:]], "torch.Tensor"),
])
def test_bad_input_raises_a_value_error_that_says_what_was_expected(change, message):
    """Misuse of the Python API: ValueError / TypeError (a type), never a UserError, which the
    command line would print without the traceback that a programming error needs."""
    maps = change([m.detach() for m in four_maps(2, 4, (3, 3), (2, 4))])
    for form in (log_p, log_p_dense):
        with pytest.raises((ValueError, TypeError), match=message) as info:
            form(*maps)
        assert not isinstance(info.value, UserError)
        assert "got" in str(info.value)


def test_check_false_skips_only_the_finiteness_scan():
    maps = [m.detach() for m in four_maps(2, 4, (3, 3), (2, 4))]
    maps[1] = torch.full_like(maps[1], math.nan)
    assert torch.isnan(log_p(*maps, check=False)).all()  # no scan: NaN in, NaN out
    with pytest.raises(ValueError, match="must have the same shape"):
        log_p(maps[0], maps[1], maps[2][:, :, :2], maps[3], check=False)  # shapes are still checked


@pytest.mark.parametrize("options, message", [
    ({"eps": -1e-4}, "eps"), ({"eps": math.nan}, "eps"),
    ({"block_rows": 0}, "block_rows"), ({"block_cols": 2.5}, "block_cols"),
])
def test_bad_options_raise_a_value_error(options, message):
    maps = [m.detach() for m in four_maps(1, 4, (3, 3), (2, 4))]
    with pytest.raises(ValueError, match=message):
        log_p(*maps, **options)


def test_loss_benchmark_writes_a_table_whose_forms_agree(tmp_path, capsys):
    from fmapicon.bench import loss

    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    loss.add_arguments(parser)
    out = tmp_path / "loss.json"
    args = parser.parse_args(["--n", "64,196", "--batch", "2,1", "--channels", "8", "--scale", "4", "--repeat", "1",
                              "--device", "cpu", "--dense-cap-gb", "0.0005", "--json", str(out)])
    assert loss.main(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["n"], r["batch"]) for r in rows] == [(64, 2), (196, 1)]
    assert rows[0]["dense"] == "ran" and rows[0]["value_diff"] < 1e-4 and rows[0]["grad_diff"] < 1e-4
    assert rows[0]["ratio"] > 0 and rows[0]["fast_s"] > 0
    assert rows[1]["dense"].startswith("skipped") and rows[1]["dense_s"] is None
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["--n", "0"])


def test_shuffled_pairs_a_with_the_next_samples_b():
    maps = [m.detach() for m in four_maps(3, 4, (3, 4), (4, 3))]
    a1, b2, a3, b4 = maps
    expected = log_p(a1, b2.roll(1, 0), a3, b4.roll(1, 0))
    torch.testing.assert_close(log_p_shuffled(*maps), expected, atol=0, rtol=0)
    # a perfect positional code: as good on shuffled pairs as on true ones
    code = torch.eye(9, dtype=torch.float64).reshape(9, 3, 3).expand(2, 9, 3, 3) * 20
    torch.testing.assert_close(log_p_shuffled(code, code, code, code), log_p(code, code, code, code))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        log_p_shuffled(*(m[:1] for m in maps))


def test_removed_options_are_refused_not_ignored():
    """The co-visibility masks and the near-home radius left the objective: passing them is a
    TypeError, never a silently different objective."""
    maps = [m.detach() for m in four_maps(2, 4, (3, 3), (3, 3))]
    for removed in (dict(visible=(None,) * 4), dict(home_radius=1)):
        with pytest.raises(TypeError, match="unexpected keyword"):
            log_p(*maps, **removed)
