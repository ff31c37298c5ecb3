"""Figures: PCA colours of known features, curves from a metrics file, masks, heat and flow colours, feature pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fmapicon.experiments import figures
from fmapicon.data.davis import davis_palette

pytest.importorskip("matplotlib")


def test_pca_colours_follow_known_components():
    """Features = 3 x-ramp + 2 y-ramp + 1 checkerboard (orthogonal, decreasing variance) in 8 channels,
    mixed by a random rotation: red must follow x, green y, blue the checkerboard, all increasing."""
    h, w = 24, 24
    y, x = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    checker = np.where((np.arange(h)[:, None] + np.arange(w)[None]) % 2 == 0, 1.0, -1.0)
    latent = np.zeros((8, h, w))
    latent[0], latent[1], latent[2] = 3 * x, 2 * y, 1 * checker
    rotation, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(8, 8)))
    features = np.einsum("dc,chw->dhw", rotation, latent)
    (picture,) = figures.pca_colors(features)
    assert picture.shape == (h, w, 3) and picture.dtype == np.uint8
    red, green, blue = (picture[..., k].astype(float) for k in range(3))
    # each channel is a monotone function of its latent factor (up to the sign fixed by the rule)
    for channel, factor in [(red, x), (green, y), (blue, checker)]:
        correlation = np.corrcoef(channel.ravel(), factor.ravel())[0, 1]
        assert abs(correlation) > 0.99
    # and each channel ignores the other factors
    assert abs(np.corrcoef(red.ravel(), y.ravel())[0, 1]) < 0.05
    assert abs(np.corrcoef(green.ravel(), x.ravel())[0, 1]) < 0.05
    # the stretch fills [0, 255]
    assert red.min() == 0 and red.max() == 255


def test_pca_sign_rule_makes_pictures_reproducible():
    """Negating the features (same subspace, flipped singular vectors) gives the same picture."""
    features = np.random.default_rng(1).normal(size=(16, 10, 12))
    (a,) = figures.pca_colors(features)
    (b,) = figures.pca_colors(-features)
    # -features has basis rows flipped; the rule flips them back, so projections of -x are negated:
    # the picture of -features is the photographic negative of the picture of features
    assert np.abs(a.astype(int) + b.astype(int) - 255).max() <= 1


def test_pca_shared_basis_across_maps_and_low_rank():
    """A list is projected on one basis: the same feature vector gets the same colour in both maps."""
    rng = np.random.default_rng(2)
    first = rng.normal(size=(6, 8, 8))
    second = first[:, ::-1, :].copy()  # the same vectors, rearranged
    a, b = figures.pca_colors([first, second])
    assert np.array_equal(a[::-1], b)
    # a rank-1 map: one varying channel, the rest grey
    ramp = np.zeros((4, 5, 5))
    ramp[2] = np.arange(25).reshape(5, 5)
    (picture,) = figures.pca_colors(ramp)
    assert picture[..., 0].max() == 255 and picture[..., 0].min() == 0
    assert np.all(picture[..., 1] == 128) and np.all(picture[..., 2] == 128)


def test_overlay_mask_uses_davis_palette():
    frame = np.full((10, 12, 3), 100, dtype=np.uint8)
    ids = np.zeros((10, 12), dtype=np.uint8)
    ids[2:8, 3:9] = 2
    out = figures.overlay_mask(frame, ids, alpha=0.5, outline=False)
    colour = davis_palette()[2].astype(float)
    expected = ((0.5 * 100 + 0.5 * colour) + 0.5).astype(np.uint8)
    assert np.array_equal(out[4, 5], expected)
    assert np.array_equal(out[0, 0], frame[0, 0])  # background untouched
    outlined = figures.overlay_mask(frame, ids, alpha=0.5)
    assert np.array_equal(outlined[2, 5], davis_palette()[2])  # boundary drawn opaque
    assert np.array_equal(outlined[4, 5], expected)  # interior unchanged
    with pytest.raises(ValueError):
        figures.overlay_mask(frame, ids[:5])


def _fake_metrics(path, steps=40):
    rng = np.random.default_rng(0)
    with open(path, "w") as handle:
        for step in range(1, steps + 1):
            log_p = -3.0 + 2.5 * step / steps + 0.05 * rng.normal()
            record = {"step": step, "loss": -log_p, "log_p": log_p, "lambda": 12.0, "lr": 1e-3,
                      "grad_norm": 1.0, "pairs_per_s": 10.0}
            if step % 5 == 0:
                record["log_p_shuffled"] = log_p - 1.0
            handle.write(json.dumps(record) + "\n")
        handle.write('{"step": 41, "loss"')  # a torn last line, as after a kill


def test_curves_from_metrics_file(tmp_path):
    _fake_metrics(tmp_path / "metrics.jsonl")
    records = figures.read_metrics(tmp_path)
    assert len(records) == 40 and records[-1]["step"] == 40
    steps, shuffled = figures._series(records, "log_p_shuffled")
    assert list(steps) == [5, 10, 15, 20, 25, 30, 35, 40]
    out = figures.plot_training_curves(tmp_path, tmp_path / "curves.png", title="fake")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 150
    both = figures.plot_log_p_comparison({"a": tmp_path, "b": records[:20]}, tmp_path / "cmp.png")
    assert both.is_file()
    with pytest.raises(figures.UserError):
        figures.read_metrics(tmp_path / "nowhere")


def test_smooth_is_a_trailing_mean():
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert np.allclose(figures._smooth(values, 2), [1.0, 1.5, 2.5, 3.5, 4.5])


def test_flow_to_color_middlebury_wheel():
    zero = figures.flow_to_color(np.zeros((4, 5, 2), np.float32))
    assert zero.shape == (4, 5, 3) and zero.dtype == np.uint8
    assert np.all(zero == 255)  # zero flow is white
    left = figures.flow_to_color(np.array([[[-1.0, 0.0]]]))[0, 0]
    assert tuple(left) == (0, 208, 255)  # hue 27 of 55: between cyan and blue, floor(255 * 9/11) = 208
    half = figures.flow_to_color(np.array([[[-1.0, 0.0], [-2.0, 0.0]]]))[0]
    assert tuple(half[0]) == (127, 231, 255)  # half the maximum length: halfway to white
    darker = figures.flow_to_color(np.array([[[-2.0, 0.0]]]), max_flow=1.0)[0, 0]
    assert tuple(darker) == (0, 156, 191)  # beyond max_flow: the hue times 0.75


def test_heat_colours_are_matplotlibs_map_from_zero_to_top():
    from matplotlib import colormaps

    values = np.array([[0.0, 1.0, 2.0, np.nan]])
    heat = figures.heat_colors(values, top=1.0)
    assert heat.shape == (1, 4, 3) and heat.dtype == np.uint8
    first, last = (np.round(np.array(colormaps["inferno"](x)[:3]) * 255).astype(np.uint8) for x in (0.0, 1.0))
    assert (heat[0, 0] == first).all() and (heat[0, 1] == last).all() and (heat[0, 2] == last).all()
    assert (heat[0, 3] == first).all()  # NaN shows as 0
