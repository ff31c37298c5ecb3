"""Photometric augmentation: SimCLR's colour distortion, drawn per sample and per draw."""

from __future__ import annotations

import pytest
import torch

from fmapicon.core.augment import four_draws, make_augmentation
from fmapicon.core.photometric import LUMA, ColorJitter, grey, turn_hue
from fmapicon.errors import UserError


def colours(batch=4, size=6, seed=0):
    """Mid-range colours (0.2..0.8) so that a small hue turn stays inside [0, 1]."""
    return 0.2 + 0.6 * torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed),
                                  dtype=torch.float64)


def test_grey_is_bt601_luma():
    pixel = torch.tensor([0.5, 0.25, 1.0], dtype=torch.float64).view(1, 3, 1, 1)
    assert float(grey(pixel)) == pytest.approx(0.299 * 0.5 + 0.587 * 0.25 + 0.114 * 1.0)
    assert sum(LUMA) == pytest.approx(1.0)


def test_hue_turn_keeps_luma_and_greys_and_a_full_turn_is_the_identity():
    x = colours()
    turned = turn_hue(x, torch.full((4,), 0.05, dtype=torch.float64))
    assert (turned - x).abs().max() > 0.01  # it does turn
    assert torch.allclose(grey(turned), grey(x), atol=1e-6)
    assert torch.allclose(turn_hue(x, torch.ones(4, dtype=torch.float64)), x, atol=1e-9)
    assert torch.allclose(turn_hue(turn_hue(x, torch.full((4,), 0.05, dtype=torch.float64)),
                                   torch.full((4,), -0.05, dtype=torch.float64)), x, atol=1e-9)
    greys = grey(x).expand(-1, 3, -1, -1)
    assert torch.allclose(turn_hue(greys, torch.full((4,), 0.3, dtype=torch.float64)), greys, atol=1e-9)


def test_constant_images_get_a_brightness_factor_in_simclrs_range():
    """A constant grey image: contrast, saturation and hue leave it alone, so the output over
    the input is the brightness factor: uniform on [1 - 0.8 s, 1 + 0.8 s] for 80% of the
    samples, exactly 1 for the rest."""
    strength, n = 0.5, 4000
    x = torch.full((n, 3, 2, 2), 0.5, dtype=torch.float64)
    out = ColorJitter(strength, p_grey=0.0)(x, torch.Generator().manual_seed(1))
    assert torch.allclose(out, out[:, :1].expand_as(out))  # still grey
    ratio = out[:, 0, 0, 0] / 0.5
    assert ratio.min() >= 1 - 0.8 * strength - 1e-9 and ratio.max() <= 1 + 0.8 * strength + 1e-9
    assert ratio.min() < 1 - 0.78 * strength and ratio.max() > 1 + 0.78 * strength
    untouched = float((ratio == 1).double().mean())
    assert 0.17 < untouched < 0.23, untouched


def test_grey_probability_and_strength_zero():
    x = colours()
    all_grey = ColorJitter(1.0, p_jitter=0.0, p_grey=1.0)(x, torch.Generator().manual_seed(0))
    assert torch.allclose(all_grey, grey(x).expand_as(x), atol=1e-12)
    assert ColorJitter(0.0)(x) is x


def test_draws_are_per_sample_and_follow_the_generator():
    x = colours(batch=1).expand(8, -1, -1, -1)
    jitter = ColorJitter(0.5)
    one = jitter(x, torch.Generator().manual_seed(3))
    assert torch.equal(one, jitter(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(one, jitter(x, torch.Generator().manual_seed(4)))
    distinct = {tuple(sample.flatten()[:3].tolist()) for sample in one}
    assert len(distinct) >= 6  # eight identical inputs, (almost) eight different outputs
    assert one.min() >= 0 and one.max() <= 1


def test_bad_arguments_are_refused():
    with pytest.raises(UserError, match="strength"):
        ColorJitter(-0.1)
    with pytest.raises(UserError, match="p_grey"):
        ColorJitter(0.5, p_grey=1.5)
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        ColorJitter(0.5)(torch.zeros(2, 1, 4, 4))


def test_four_draws_jitter_each_draw_and_leave_the_geometry_alone():
    """Probe: the network sees grey inputs when every draw is greyed; with strength 0 the four
    maps equal those without jitter, whatever the jitter generator (its own stream)."""
    seen = []

    def network(images):
        seen.append(images)
        return images

    a, b = colours(batch=2, size=8, seed=1).float(), colours(batch=2, size=8, seed=2).float()
    augmentation = make_augmentation("roll+affine")
    four_draws(network, a, b, augmentation, torch.Generator().manual_seed(0),
               jitter=ColorJitter(1.0, p_jitter=0.0, p_grey=1.0), jitter_generator=torch.Generator().manual_seed(5))
    assert len(seen) == 4 and all(torch.allclose(s[:, 0], s[:, 1]) and torch.allclose(s[:, 1], s[:, 2])
                                  for s in seen)
    plain = four_draws(network, a, b, augmentation, torch.Generator().manual_seed(0))
    off = four_draws(network, a, b, augmentation, torch.Generator().manual_seed(0), jitter=ColorJitter(0.0),
                     jitter_generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(p, o) for p, o in zip(plain, off))
    jittered = four_draws(network, a, b, augmentation, torch.Generator().manual_seed(0),
                          jitter=ColorJitter(0.8, p_jitter=1.0, p_grey=0.0), jitter_generator=torch.Generator().manual_seed(9))
    assert not any(torch.allclose(j, p, atol=1e-3) for j, p in zip(jittered, plain))  # every draw is jittered
