"""Phi^AB from features: known shifts, the dense reference, tiling, radius, IC error, pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmapicon.evaluation.correspond import (DEFAULT_TEMPERATURE, compose, correspondence, default_temperature,
                                 features_at_stride, inverse_consistency_error, match_images, pixel_flow)
from fmapicon.data.flow import resize_flow


def unit_features(batch=2, channels=16, height=20, width=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(batch, channels, height, width, generator=generator), dim=1)


def dense_reference(fa, fb, radius=None, temperature=None):
    """The whole N x N' score matrix at once (what the tiled code must never build at scale)."""
    batch, _, height, width = fa.shape
    scores = fa.flatten(2).transpose(1, 2) @ fb.flatten(2)
    ys, xs = torch.meshgrid(torch.arange(fb.shape[2]), torch.arange(fb.shape[3]), indexing="ij")
    key_x, key_y = xs.flatten().float(), ys.flatten().float()
    qy, qx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    query_x, query_y = qx.flatten().float(), qy.flatten().float()
    if radius is not None:
        outside = ((key_x[None] - query_x[:, None]).abs() > radius) | ((key_y[None] - query_y[:, None]).abs() > radius)
        scores = scores.masked_fill(outside, float("-inf"))
    if temperature is None:
        best = scores.argmax(-1)
        match_x, match_y = key_x[best], key_y[best]
    else:
        weights = torch.softmax(scores / temperature, -1)
        match_x, match_y = weights @ key_x, weights @ key_y
    u, v = match_x - query_x, match_y - query_y
    return torch.stack([u, v], 1).view(batch, 2, height, width)


def test_integer_shift_is_recovered_exactly_by_argmax():
    fa = unit_features()
    dy, dx = 3, -2
    fb = torch.roll(fa, shifts=(dy, dx), dims=(2, 3))  # B(y + 3, x - 2) = A(y, x)
    phi = correspondence(fa, fb)
    assert phi.shape == (2, 2, 20, 24) and phi.dtype == torch.float32
    interior = phi[:, :, 3:-3, 3:-3]  # wrap-around only moves the border
    assert torch.all(interior[:, 0] == dx) and torch.all(interior[:, 1] == dy)
    back = correspondence(fb, fa)
    assert torch.all(back[:, 0, 3:-3, 3:-3] == -dx) and torch.all(back[:, 1, 3:-3, 3:-3] == -dy)


def test_argmax_and_soft_argmax_match_the_dense_reference():
    fa, fb = unit_features(seed=1), unit_features(seed=2)
    torch.testing.assert_close(correspondence(fa, fb), dense_reference(fa, fb), rtol=0, atol=0)
    soft = correspondence(fa, fb, soft=True, temperature=0.1)
    torch.testing.assert_close(soft, dense_reference(fa, fb, temperature=0.1), rtol=0, atol=1e-4)
    assert soft.abs().max() > 0  # a real average, not the identity
    local = correspondence(fa, fb, radius=2)
    torch.testing.assert_close(local, dense_reference(fa, fb, radius=2), rtol=0, atol=0)
    assert local.abs().max() <= 2
    torch.testing.assert_close(correspondence(fa, fb, soft=True, temperature=0.1, radius=3),
                               dense_reference(fa, fb, radius=3, temperature=0.1), rtol=0, atol=1e-4)


def test_soft_argmax_with_a_tiny_temperature_equals_argmax():
    # B a noisy, shifted copy of A: clear best matches, not all of them the shift
    fa = unit_features(seed=3)
    fb = F.normalize(torch.roll(fa, shifts=(1, 2), dims=(2, 3)) + 0.5 * unit_features(seed=4), dim=1)
    hard = correspondence(fa, fb)
    soft = correspondence(fa, fb, soft=True, temperature=1e-3)
    torch.testing.assert_close(soft, hard, rtol=0, atol=1e-3)


@pytest.mark.parametrize("radius", [None, 1, 4])
@pytest.mark.parametrize("soft", [False, True])
def test_tiled_result_equals_untiled(radius, soft):
    fa, fb = unit_features(height=12, width=14, seed=5), unit_features(height=12, width=14, seed=6)
    options = dict(soft=soft, temperature=0.05, radius=radius)
    whole = correspondence(fa, fb, block=12 * 14, **options)
    for block in (5, 20):
        torch.testing.assert_close(correspondence(fa, fb, block=block, **options), whole, rtol=0, atol=1e-4)


def test_radius_covering_the_image_equals_unrestricted_search():
    fa, fb = unit_features(seed=7), unit_features(seed=8)
    for soft in (False, True):
        unrestricted = correspondence(fa, fb, soft=soft)
        covering = correspondence(fa, fb, soft=soft, radius=24, block=25)
        torch.testing.assert_close(covering, unrestricted, rtol=0, atol=1e-5)


def test_grids_of_different_sizes():
    fa = unit_features(batch=1, height=10, width=12, seed=9)
    fb = F.interpolate(fa, size=(20, 24), mode="nearest")  # each A cell becomes a 2 x 2 block of B
    phi = correspondence(fa, fb)
    assert phi.shape == (1, 2, 10, 12)
    ys, xs = torch.meshgrid(torch.arange(10.0), torch.arange(12.0), indexing="ij")
    match_x, match_y = xs + phi[0, 0], ys + phi[0, 1]
    assert torch.all((match_x // 2 == xs) & (match_y // 2 == ys))  # lands in its own block
    # radius centres follow the relative position: the match is still found with radius 1
    torch.testing.assert_close(correspondence(fa, fb, radius=1), phi, rtol=0, atol=0)


def smooth_features(height, width, channels=16, sigma=3.0, margin=12, seed=0):
    """Unit features with spatial extent (Gaussian-blurred noise), as networks give, on a grid
    ``margin`` cells larger on every side, so that shifted crops of it are exact shifts."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(channels, 1, height + 2 * margin + 16, width + 2 * margin + 16, generator=generator)
    kernel = torch.exp(-torch.arange(-8, 9.0) ** 2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    blurred = F.conv2d(F.conv2d(noise, kernel.view(1, 1, -1, 1)), kernel.view(1, 1, 1, -1))
    return F.normalize(blurred.reshape(1, channels, *blurred.shape[-2:]), dim=1)


def test_coarse_to_fine_finds_a_shift_beyond_any_radius():
    big = smooth_features(48, 64, margin=24)
    dy, dx = 17, -21  # B(y + 17, x - 21) = A(y, x): far outside a radius-2 window at every level
    fa = big[:, :, 24:72, 24:88]
    fb = big[:, :, 24 - dy:72 - dy, 24 - dx:88 - dx]
    truth = torch.tensor([float(dx), float(dy)]).view(1, 2, 1, 1)
    seen = (slice(None), slice(None), slice(None, 48 - dy), slice(-dx, None))  # A cells whose match is in B
    for levels in (1, 2, 3):
        phi = correspondence(fa, fb, levels=levels, radius=2)
        # a coarse cell that straddles the edge of what B sees is matched by its visible part or
        # not at all: exact everywhere 2^levels cells inside that edge
        inner = (slice(None), slice(None), slice(None, 48 - dy - 2**levels), slice(-dx + 2**levels, None))
        assert torch.equal(phi[inner], truth.expand_as(phi)[inner]), levels
        assert (phi[seen] == truth.expand_as(phi)[seen]).all(1).float().mean() > 0.9
    assert not torch.equal(correspondence(fa, fb, radius=2)[seen], truth.expand_as(fa[:, :2])[seen])
    # soft at the finest level: the mean of a window around the right place (smooth features
    # score the neighbours nearly as high, so sub-cell pulls but no jumps)
    soft = correspondence(fa, fb, levels=2, radius=2, soft=True, temperature=0.01)
    inner = (slice(None), slice(None), slice(None, 48 - dy - 4), slice(-dx + 4, None))
    assert (soft[inner] - truth).abs().max() < 1


@pytest.mark.parametrize("sizes", [((12, 14), (12, 14)), ((11, 13), (9, 16))])
@pytest.mark.parametrize("soft", [False, True])
def test_coarse_to_fine_with_covering_windows_is_the_flat_search(sizes, soft):
    """Refinement windows that cover all of B at every level make each level a full search:
    the result must then be the flat search's, which checks the windows' bookkeeping (centres,
    offsets, borders, grids of different sizes, chunking) against the tested flat code."""
    fa = unit_features(batch=2, height=sizes[0][0], width=sizes[0][1], seed=13)
    fb = unit_features(batch=2, height=sizes[1][0], width=sizes[1][1], seed=14)
    options = dict(soft=soft, temperature=0.05)
    flat = correspondence(fa, fb, **options)
    for levels, block in ((1, None), (2, 7), (5, None)):
        torch.testing.assert_close(correspondence(fa, fb, levels=levels, radius=40, block=block, **options), flat,
                                   rtol=0, atol=1e-4)


def test_coarse_to_fine_checks_its_options():
    from fmapicon.evaluation.correspond import coarse_to_fine

    fa = unit_features(batch=1)
    with pytest.raises(ValueError, match="^levels must be >= 0"):  # the parameter's name, not a flag
        coarse_to_fine(fa, fa, -1)
    assert torch.equal(correspondence(fa, fa, levels=3), torch.zeros(1, 2, 20, 24))  # identity pair, default radius


def test_inverse_consistency_error_of_an_identity_pair_is_zero():
    fa = unit_features()
    phi_ab, phi_ba = correspondence(fa, fa), correspondence(fa, fa)
    assert torch.all(phi_ab == 0)
    assert torch.all(inverse_consistency_error(phi_ab, phi_ba) == 0)


def test_inverse_consistency_error_of_shift_pairs():
    shift = torch.zeros(1, 2, 8, 9)
    shift[:, 0], shift[:, 1] = 1.5, -2.0
    error = inverse_consistency_error(shift, -shift)  # mutually inverse: zero everywhere
    assert error.shape == (1, 8, 9) and torch.all(error.abs() < 1e-5)
    twice = inverse_consistency_error(shift, shift)  # A->B and B->A both +s: |2 s| = 5
    torch.testing.assert_close(twice, torch.full((1, 8, 9), 5.0))
    composed = compose(shift, 2 * shift)
    torch.testing.assert_close(composed, 3 * shift)


def test_ic_error_samples_phi_ab_where_phi_ba_lands():
    # phi_ba sends every pixel of B one column right; phi_ab varies by column
    phi_ab = torch.zeros(1, 2, 4, 6)
    phi_ab[0, 0] = -torch.arange(6.0) * 0.5
    phi_ba = torch.zeros(1, 2, 4, 6)
    phi_ba[0, 0] = 1.0
    error = inverse_consistency_error(phi_ab, phi_ba)
    # y -> y + 1 -> y + 1 + phi_ab(y + 1) = y + 1 - (y + 1) / 2; the last column reads the edge (5)
    columns = torch.arange(6.0)
    expected = (1 - 0.5 * (columns + 1).clamp(max=5)).abs()
    torch.testing.assert_close(error[0], expected.expand(4, -1))


def test_pixel_flow_equals_resize_flow_on_equal_grids_and_handles_unequal_ones():
    phi = torch.randn(1, 2, 6, 8)
    torch.testing.assert_close(pixel_flow(phi, (24, 32)), resize_flow(phi, (24, 32)))
    # B is twice A's size with the same cell grid: B's cells are twice as large
    zero = torch.zeros(1, 2, 6, 8)
    flow = pixel_flow(zero, (24, 32), (48, 64))
    # pixel p of A sits at the relative place of pixel 2 p + 0.5 of B: displacement p + 0.5,
    # exact between the outermost cell centres (1.5 and 29.5), constant beyond them
    columns, rows = torch.arange(32.0), torch.arange(24.0)
    torch.testing.assert_close(flow[0, 0], (columns + 0.5).clamp(2, 30).expand(24, -1))
    torch.testing.assert_close(flow[0, 1], (rows + 0.5).clamp(2, 22)[:, None].expand(-1, 32))


class ShiftEquivariantModel(torch.nn.Module):
    """A fixed random convolution: features shift exactly with the image (a local test model
    standing in for fmapicon.evaluation.features.load_model)."""

    stride = 1
    default_input_scale = 1.0
    name = "random-conv"

    def __init__(self, lambda_=None):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 32, 5, padding=2)
        if lambda_ is not None:
            self.lambda_ = lambda_

    def forward(self, images):
        return F.normalize(self.conv(images), dim=1)


def test_features_at_stride_are_unit_cells_of_stride_pixels():
    model = ShiftEquivariantModel()
    images = torch.rand(2, 3, 37, 50)
    features = features_at_stride(model, images, stride=4)
    assert features.shape == (2, 32, 9, 12)  # round(37 / 4), round(50 / 4)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(2, 9, 12))
    half = features_at_stride(model, images, stride=4, input_scale=0.5)
    assert half.shape == features.shape


def test_match_images_recovers_a_pixel_shift():
    model = ShiftEquivariantModel()
    generator = torch.Generator().manual_seed(1)
    scene = torch.rand(1, 3, 96, 112, generator=generator)
    image_a, image_b = scene[:, :, 8:72, 8:104], scene[:, :, 0:64, 16:112]  # B(y + 8, x - 8) = A(y, x)
    result = match_images(model, image_a, image_b, stride=4)
    assert result.flow_ab.shape == (1, 2, 64, 96) and result.flow_ba.shape == (1, 2, 64, 96)
    # the overlap (A rows 0-56, columns 8-96; B rows 8-64, columns 0-88) less a 12-pixel
    # margin for the convolution, the antialiased cells and the bilinear upsampling
    in_a = (0, slice(None), slice(12, 44), slice(20, 84))
    in_b = (0, slice(None), slice(20, 52), slice(12, 76))
    assert torch.all(result.flow_ab[in_a][0] == -8) and torch.all(result.flow_ab[in_a][1] == 8)
    assert torch.all(result.flow_ba[in_b][0] == 8) and torch.all(result.flow_ba[in_b][1] == -8)
    assert torch.all(result.ic_error[0, 20:52, 12:76] < 1e-4)
    assert result.ic_error.shape == (1, 64, 96) and result.ic_error.max() > 1  # not zero outside
    assert result.temperature is None
    local = match_images(model, image_a, image_b, stride=4, radius=3)
    torch.testing.assert_close(local.flow_ab[in_a], result.flow_ab[in_a])


def test_soft_temperature_defaults_to_one_over_lambda_squared():
    assert DEFAULT_TEMPERATURE == pytest.approx(1 / 144)
    assert default_temperature(ShiftEquivariantModel()) == pytest.approx(1 / 144)
    assert default_temperature(ShiftEquivariantModel(lambda_=torch.tensor(20.0))) == pytest.approx(1 / 400)
    images = torch.rand(1, 3, 16, 16)
    result = match_images(ShiftEquivariantModel(lambda_=10.0), images, images, soft=True)
    assert result.temperature == pytest.approx(0.01)


def test_argmax_ties_go_to_the_nearest_cell():
    # a flat image: every cell of B scores the same, the match is the cell's own place
    flat = F.normalize(torch.ones(1, 8, 9, 11), dim=1)
    assert torch.all(correspondence(flat, flat) == 0)
    assert torch.all(correspondence(flat, flat, radius=3, block=4) == 0)
    # a region of equal features: the nearest of the tied cells wins, not the first one
    fa = unit_features(batch=1, channels=8, height=9, width=11, seed=10)
    fb = fa.clone()
    fb[:, :, :, 5:8] = fa[:, :, :, 6:7]  # columns 5, 6, 7 of B all look like column 6 of A
    phi = correspondence(fa, fb)
    assert torch.all(phi[0, 0, :, 6] == 0) and torch.all(phi[0, 1, :, 6] == 0)


def _run_cli(argv):
    from fmapicon.cli import main

    return main(argv)


def test_match_cli_end_to_end_on_a_flyingchairs_pair(flyingchairs_dir, tmp_path, capsys):
    from fmapicon.data.flow import epe_stats, read_flo

    stem = flyingchairs_dir / "0000000"
    out = tmp_path / "out"
    argv = ["match", f"{stem}-img0.ppm", f"{stem}-img1.ppm", "--model", "pixels", "--out", str(out),
            "--gt-flow", f"{stem}-gt.flo", "--radius", "4", "--device", "cpu"]
    assert _run_cli(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["flow_ab.flo", "flow_ba.flo", "match.png", "metrics.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"ic_error_mean", "epe_mean", "epe_median", "outliers_3px"} <= set(metrics)
    flow_ab, gt = read_flo(out / "flow_ab.flo"), read_flo(f"{stem}-gt.flo")
    assert flow_ab.shape == gt.shape == (384, 512, 2) and read_flo(out / "flow_ba.flo").shape == (384, 512, 2)
    expected = epe_stats(flow_ab, gt)  # the metrics come from the written full-resolution flow
    assert all(metrics[key] == pytest.approx(value, rel=1e-6) for key, value in expected.items())
    assert np.abs(flow_ab).max() <= 4 * 4 + 1e-3  # radius 4 cells of 4 pixels
    assert 0 <= metrics["outliers_3px"] <= 1 and metrics["ic_error_mean"] >= 0
    from PIL import Image

    with Image.open(out / "match.png") as picture:
        assert picture.width >= 3 * 512 and picture.height >= 2 * 384
    assert "epe_mean" in capsys.readouterr().out
    assert metrics["levels"] == 0 and metrics["radius"] == 4
    assert _run_cli([*argv, "--levels", "3", "--radius", "2", "--out", str(tmp_path / "c2f")]) == 0
    coarse_to_fine = json.loads((tmp_path / "c2f" / "metrics.json").read_text())
    assert (coarse_to_fine["levels"], coarse_to_fine["radius"]) == (3, 2)
    assert coarse_to_fine["epe_mean"] == pytest.approx(epe_stats(read_flo(tmp_path / "c2f" / "flow_ab.flo"), gt)["epe_mean"])


def test_match_cli_errors_are_clear(tmp_path, capsys):
    from PIL import Image

    from fmapicon.data.flow import write_flo

    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(image)
    (tmp_path / "broken.png").write_text("not an image")
    write_flo(tmp_path / "small.flo", np.zeros((8, 8, 2), np.float32))
    (tmp_path / "corrupt.flo").write_bytes(b"\0" * 20)
    cases = [
        ([str(tmp_path / "missing.png"), str(image)], "no image at"),
        ([str(tmp_path / "broken.png"), str(image)], "cannot read"),
        ([str(image), str(image), "--gt-flow", str(tmp_path / "small.flo")], "8 x 8 pixels but image A is 24 x 16"),
        ([str(image), str(image), "--gt-flow", str(tmp_path / "corrupt.flo")], "not a .flo file"),
        ([str(image), str(image), "--gt-flow", str(tmp_path / "none.flo")], "no flow file"),
        ([str(image), str(image), "--model", "no-such-model"], "unknown model"),
    ]
    for args, message in cases:
        assert _run_cli(["match", *args, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        _run_cli(["match", str(image), str(image), "--stride", "0"])
    out = tmp_path / "done"
    argv = ["match", str(image), str(image), "--model", "pixels", "--out", str(out), "--device", "cpu"]
    assert _run_cli(argv) == 0
    before = (out / "flow_ab.flo").stat().st_mtime_ns
    assert _run_cli(argv) == 2 and "already holds 4 entries" in capsys.readouterr().err
    assert (out / "flow_ab.flo").stat().st_mtime_ns == before            # refused before anything is written
    assert _run_cli([*argv, "--force"]) == 0


def test_bench_match_on_synthetic_pairs(tmp_path, capsys):
    pytest.importorskip("fmapicon.data.synth")
    from fmapicon.bench.match import synth_pairs
    from fmapicon.data.flow import read_flo

    out = tmp_path / "bench.json"
    argv = ["bench", "match", "--synth", "--synth-sequences", "1", "--synth-frames", "3", "--synth-size", "64",
            "--baselines", "zero,pixels", "--radius", "none,2", "--device", "cpu", "--json", str(out)]
    assert _run_cli(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["method"], row["radius"]) for row in rows] == [("zero", "-"), ("pixels", "none"), ("pixels", 2)]
    assert all(row["pairs"] == 2 and row["dataset"] == "synth" for row in rows)
    # the zero flow's EPE is the mean length of the true flow (same scenes, same seed)
    flows = [read_flo(pair.flow) for pair in synth_pairs(tmp_path / "again", 1, 3, 64)]
    lengths = [np.hypot(*flow.transpose(2, 0, 1)).mean() for flow in flows]
    assert rows[0]["epe_mean"] == pytest.approx(np.mean(lengths), rel=1e-5)
    assert rows[2]["s_per_pair"] > 0 and "epe_mean" in capsys.readouterr().out
    # coarse to fine: a levels column; 'none' is not a refinement window and is skipped with a note
    argv = [*argv[:-2], "--levels", "0,2", "--json", str(out)]
    assert _run_cli(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(row["method"], row["levels"], row["radius"]) for row in rows] == [
        ("zero", "-", "-"), ("pixels", 0, "none"), ("pixels", 0, 2), ("pixels", 2, 2)]
    assert "radius 'none' is run with levels 0 only" in capsys.readouterr().out
    assert _run_cli([*argv[:argv.index("--radius")], "--radius", "none", "--levels", "2", "--device", "cpu"]) == 2
    assert "--levels > 0 needs a --radius" in capsys.readouterr().err


def test_maps_follow_the_device(device):
    fa, fb = unit_features(seed=11), unit_features(seed=12)
    for options in (dict(), dict(radius=3), dict(soft=True, temperature=0.1)):
        on_device = correspondence(fa.to(device), fb.to(device), **options)
        assert on_device.device.type == device.type
        torch.testing.assert_close(on_device.cpu(), correspondence(fa, fb, **options), rtol=0, atol=1e-4)
    phi = correspondence(fa, fb)
    flow = pixel_flow(phi.to(device), (80, 96))
    error = inverse_consistency_error(flow, flow)
    assert flow.device.type == error.device.type == device.type
    on_cpu = pixel_flow(phi, (80, 96))
    torch.testing.assert_close(error.cpu(), inverse_consistency_error(on_cpu, on_cpu), rtol=0, atol=1e-3)


def test_features_at_the_models_own_stride_are_its_features():
    from fmapicon.evaluation.features import load_model

    model = load_model("pixels", "cpu", stride=8)
    images = torch.rand(1, 3, 40, 48)
    torch.testing.assert_close(features_at_stride(model, images, stride=8), model(images))
    odd = features_at_stride(model, torch.rand(1, 3, 45, 50), stride=4)  # ceil-padded grid, finer cells
    assert odd.shape == (1, 27, 11, 12)
    torch.testing.assert_close(odd.norm(dim=1), torch.ones(1, 11, 12))
