"""Equivariant augmentation: round trips, the coordinate conventions (also on a feature map
at half resolution), per-sample independence, composition order, the swap, seeding, and
the four draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmapicon.core.augment import (
    AUGMENTATIONS,
    Affine,
    AffineDraw,
    Compose,
    ComposedDraw,
    NoAugmentation,
    Roll,
    RollDraw,
    augmented_features,
    four_draws,
    make_augmentation,
)


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _linear_image(batch, height, width, channels=3):
    """Images linear in the normalized pixel-centre coordinates (align_corners=False)."""
    x = (torch.arange(width) + 0.5) / width * 2 - 1
    y = (torch.arange(height) + 0.5) / height * 2 - 1
    coefficients = torch.randn(batch, channels, 3, generator=_generator(1))
    return (coefficients[..., 0, None, None]
            + coefficients[..., 1, None, None] * x[None, None, None, :]
            + coefficients[..., 2, None, None] * y[None, None, :, None])


def _valid(draw, network, shape):
    """Where every bilinear tap of warp and unwarp fell inside: a ones image survives."""
    ones = torch.ones(shape)
    return draw.unwarp(network(draw.warp(ones))) > 1 - 1e-5


# --------------------------------------------------------------------------- roll


def test_roll_matches_np_roll_per_sample_and_round_trips_exactly():
    images = torch.rand(6, 3, 13, 17)
    draw = Roll().sample(6, 13, 17, device="cpu", generator=_generator())
    warped = draw.warp(images)
    for b in range(6):
        shifts = (int(draw.steps_y[b]), int(draw.steps_x[b]))
        expected = np.roll(images[b].numpy(), shifts, axis=(-2, -1))
        np.testing.assert_array_equal(warped[b].numpy(), expected)
    assert torch.equal(draw.unwarp(warped), images)


def test_roll_shifts_are_uniform_and_independent_per_sample():
    draw = Roll().sample(4000, 5, 7, device="cpu", generator=_generator())
    counts_y = torch.bincount(draw.steps_y, minlength=5)
    counts_x = torch.bincount(draw.steps_x, minlength=7)
    assert len(counts_y) == 5 and len(counts_x) == 7  # exactly [0, H) and [0, W)
    assert counts_y.min() > 4000 / 5 * 0.8 and counts_x.min() > 4000 / 7 * 0.8
    # y and x shifts independent: the joint table is close to the product of marginals
    joint = torch.zeros(5, 7)
    joint.index_put_((draw.steps_y, draw.steps_x), torch.ones(4000), accumulate=True)
    assert (joint / 4000 - torch.outer(counts_y / 4000.0, counts_x / 4000.0)).abs().max() < 0.02


def test_roll_with_stride_on_half_resolution_features_is_exact():
    """roll by 2k pixels -> avg_pool2d(2) -> un-roll by k feature pixels = avg_pool2d(2)."""
    images = torch.rand(5, 3, 16, 24)
    network = lambda x: F.avg_pool2d(x, 2)  # noqa: E731  a stride-2 "network"
    draw = Roll(stride=2).sample(5, 16, 24, device="cpu", generator=_generator())
    assert draw.steps_y.max() < 8 and draw.steps_x.max() < 12
    assert (draw.steps_y > 0).any()
    features = draw.unwarp(network(draw.warp(images)))
    torch.testing.assert_close(features, network(images), rtol=0, atol=1e-6)


def test_roll_unwarp_refuses_a_feature_map_that_does_not_fit_the_stride():
    draw = Roll(stride=1).sample(2, 16, 16, device="cpu", generator=_generator())
    with pytest.raises(ValueError, match="stride"):
        draw.unwarp(torch.zeros(2, 4, 8, 8))


# --------------------------------------------------------------------------- affine


def test_affine_round_trip_is_exact_on_linear_images_in_the_valid_region():
    """Bilinear interpolation reproduces a linear function exactly wherever all four taps
    are inside, so warp -> identity -> unwarp must return it to float32 rounding there."""
    images = _linear_image(8, 40, 56)
    draw = Affine().sample(8, 40, 56, device="cpu", generator=_generator())
    valid = _valid(draw, lambda x: x, images.shape)
    assert valid.float().mean() > 0.5
    back = draw.unwarp(draw.warp(images))
    assert (back - images)[valid].abs().max() < 1e-4


def test_affine_round_trip_on_a_smooth_image_is_within_interpolation_error():
    """One bilinear resampling of f errs by at most h^2 |f_xx| / 8 + h^2 |f_yy| / 8 (h = 1
    pixel); the round trip resamples twice, the second time f composed with T, whose second
    derivatives grow by |T|^2 <= 1.25 here. For sin(2 pi x / 16) cos(2 pi y / 24) that bounds
    the error in the valid region by 2 * 1.25 * ((2 pi / 16)^2 + (2 pi / 24)^2) / 8 = 0.069."""
    height, width = 48, 64
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image = torch.sin(2 * np.pi * x / 16) * torch.cos(2 * np.pi * y / 24)
    images = image.expand(6, 3, height, width)
    draw = Affine().sample(6, height, width, device="cpu", generator=_generator(3))
    valid = _valid(draw, lambda t: t, images.shape)
    back = draw.unwarp(draw.warp(images))
    bound = 2 * 1.25 * ((2 * np.pi / 16) ** 2 + (2 * np.pi / 24) ** 2) / 8
    assert (back - images)[valid].abs().max() < bound
    assert (back - images)[~valid].abs().max() > 2 * bound  # the zero borders are there and stay


def test_affine_translation_convention_known_answer():
    """T acts on normalized coordinates with align_corners=False: a translation of
    2 * 2 / W (normalized units) moves the content 2 pixels to the left."""
    images = torch.rand(1, 3, 8, 10)
    forward = torch.tensor([[[1.0, 0.0, 2 * 2 / 10], [0.0, 1.0, 0.0]]])
    backward = torch.tensor([[[1.0, 0.0, -2 * 2 / 10], [0.0, 1.0, 0.0]]])
    draw = AffineDraw(forward, backward)
    warped = draw.warp(images)
    torch.testing.assert_close(warped[..., :-2], images[..., 2:], rtol=0, atol=1e-6)
    assert warped[..., -2:].abs().max() == 0  # zero padding
    back = draw.unwarp(warped)
    torch.testing.assert_close(back[..., 2:], images[..., 2:], rtol=0, atol=1e-6)
    assert back[..., :2].abs().max() == 0  # the zero border stays, no renormalization


def test_affine_on_half_resolution_features_uses_normalized_coordinates():
    """warp -> avg_pool2d(2) -> unwarp of a linear image equals avg_pool2d(2) of it in the
    valid region: the same T^-1 un-warps a map of another resolution (align_corners=False
    puts a 2 x 2 block's centre at the mean of its four pixel centres)."""
    images = _linear_image(6, 32, 48)
    network = lambda x: F.avg_pool2d(x, 2)  # noqa: E731
    draw = Affine().sample(6, 32, 48, device="cpu", generator=_generator(2))
    valid = _valid(draw, network, images.shape)
    assert valid.shape[-2:] == (16, 24) and valid.float().mean() > 0.4
    features = draw.unwarp(network(draw.warp(images)))
    assert (features - network(images))[valid].abs().max() < 1e-4


def test_affine_matrices_statistics_and_exact_inverse():
    draw = Affine(swap=False).sample(20000, 8, 8, device="cpu", generator=_generator())
    offsets = draw.forward - torch.tensor([[1.0, 0, 0], [0, 1, 0]])
    # every entry of the top two rows is 0.05 N(0, 1): translation std 0.05 in [-1, 1]
    # units, 0.025 of the image width
    torch.testing.assert_close(offsets.std(dim=0), torch.full((2, 3), 0.05), rtol=0.03, atol=0)
    assert offsets.mean(dim=0).abs().max() < 0.002
    bottom = torch.tensor([0.0, 0.0, 1.0]).expand(20000, 1, 3)
    product = torch.cat([draw.forward, bottom], 1) @ torch.cat([draw.backward, bottom], 1)
    torch.testing.assert_close(product, torch.eye(3).expand(20000, 3, 3), rtol=0, atol=1e-6)


def test_affine_swaps_forward_and_inverse_for_about_half_of_the_samples():
    plain = Affine(swap=False).sample(4000, 8, 8, device="cpu", generator=_generator(5))
    swapped = Affine(swap=True).sample(4000, 8, 8, device="cpu", generator=_generator(5))
    is_swapped = (swapped.forward != plain.forward).flatten(1).any(dim=1)
    assert 0.45 < is_swapped.float().mean() < 0.55  # per sample, binomial std 0.008
    assert torch.equal(swapped.forward[is_swapped], plain.backward[is_swapped])
    assert torch.equal(swapped.backward[is_swapped], plain.forward[is_swapped])
    assert torch.equal(swapped.forward[~is_swapped], plain.forward[~is_swapped])


# --------------------------------------------------------------------------- composition


def test_compose_order_is_roll_then_affine_and_inverse_in_reverse():
    augmentation = make_augmentation("roll+affine")
    assert isinstance(augmentation, Compose)
    draw = augmentation.sample(3, 20, 24, device="cpu", generator=_generator())
    roll_draw, affine_draw = draw.parts
    assert isinstance(draw, ComposedDraw) and isinstance(roll_draw, RollDraw) and isinstance(affine_draw, AffineDraw)
    images = torch.rand(3, 3, 20, 24)
    torch.testing.assert_close(draw.warp(images), affine_draw.warp(roll_draw.warp(images)), rtol=0, atol=0)
    assert not torch.allclose(draw.warp(images), roll_draw.warp(affine_draw.warp(images)), atol=1e-3)
    features = torch.rand(3, 5, 20, 24)
    torch.testing.assert_close(draw.unwarp(features), roll_draw.unwarp(affine_draw.unwarp(features)), rtol=0, atol=0)


def test_roll_plus_affine_round_trip_is_exact_on_images_linear_after_the_roll():
    """Images that the draw's roll makes linear: the affine part then interpolates exactly,
    so roll -> T -> identity -> T^-1 -> un-roll returns them on the valid region."""
    draw = make_augmentation("roll+affine").sample(4, 24, 32, device="cpu", generator=_generator(7))
    images = draw.parts[0].unwarp(_linear_image(4, 24, 32))
    valid = _valid(draw, lambda x: x, images.shape)
    back = draw.unwarp(draw.warp(images))
    assert valid.float().mean() > 0.4
    assert (back - images)[valid].abs().max() < 1e-4


def test_roll_plus_affine_on_half_resolution_features():
    """Stride 2: roll by 2k -> T -> avg_pool2d(2) -> T^-1 -> un-roll by k equals
    avg_pool2d(2) of images that the roll makes linear, on the valid region."""
    network = lambda x: F.avg_pool2d(x, 2)  # noqa: E731
    draw = make_augmentation("roll+affine", stride=2).sample(4, 32, 48, device="cpu", generator=_generator(8))
    images = draw.parts[0].unwarp(_linear_image(4, 32, 48))
    valid = _valid(draw, network, images.shape)
    assert valid.shape[-2:] == (16, 24) and valid.float().mean() > 0.4
    features = draw.unwarp(network(draw.warp(images)))
    assert (features - network(images))[valid].abs().max() < 1e-4


def test_none_is_the_identity():
    images = torch.rand(2, 3, 9, 11)
    draw = NoAugmentation().sample(2, 9, 11, device="cpu")
    assert draw.warp(images) is images and draw.unwarp(images) is images


def test_make_augmentation_names_and_errors():
    assert AUGMENTATIONS == ("none", "affine", "roll", "roll+affine")
    for name in AUGMENTATIONS:
        make_augmentation(name, stride=2)
    with pytest.raises(ValueError, match="none, affine, roll, roll\\+affine"):
        make_augmentation("rotate")
    with pytest.raises(ValueError):
        Roll(stride=0)


def test_draw_refuses_a_batch_of_another_size():
    draw = Affine().sample(2, 8, 8, device="cpu")
    with pytest.raises(ValueError, match="B = 2"):
        draw.warp(torch.zeros(3, 3, 8, 8))


# --------------------------------------------------------------------------- randomness and the four draws


@pytest.mark.parametrize("name", ["affine", "roll", "roll+affine"])
def test_a_seeded_generator_reproduces_the_draws(name):
    augmentation = make_augmentation(name)
    images = torch.rand(3, 3, 16, 16)
    first = augmentation.sample(3, 16, 16, device="cpu", generator=_generator(11)).warp(images)
    again = augmentation.sample(3, 16, 16, device="cpu", generator=_generator(11)).warp(images)
    other = augmentation.sample(3, 16, 16, device="cpu", generator=_generator(12)).warp(images)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


class _CountingNetwork(torch.nn.Module):
    """Identity that records every input it sees."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x)
        return x * 1.0


def test_four_draws_calls_the_network_four_times_with_independent_draws():
    network = _CountingNetwork()
    a, b = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 12, 20)
    a1, b2, a3, b4 = four_draws(network, a, b, make_augmentation("roll"), generator=_generator())
    assert len(network.inputs) == 4
    assert [tuple(x.shape[-2:]) for x in network.inputs] == [(16, 16), (12, 20), (16, 16), (12, 20)]
    # independent draws: the network saw differently rolled copies of the same frame
    assert not torch.equal(network.inputs[0], network.inputs[2])
    assert not torch.equal(network.inputs[1], network.inputs[3])
    # an identity network is equivariant to roll: every draw returns its frame
    for features, frames in ((a1, a), (b2, b), (a3, a), (b4, b)):
        assert torch.equal(features, frames)


def test_four_draws_differ_for_a_non_equivariant_network():
    positional = torch.rand(1, 3, 16, 16)
    network = lambda x: x + positional  # noqa: E731  depends on where a pixel is
    a = torch.rand(2, 3, 16, 16)
    a1, _, a3, _ = four_draws(network, a, a, make_augmentation("roll+affine"), generator=_generator())
    assert not torch.allclose(a1, a3, atol=1e-3)


def test_augmented_features_passes_gradients_through():
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    features = augmented_features(lambda x: 2 * x, images, make_augmentation("roll"))
    features.sum().backward()
    torch.testing.assert_close(images.grad, torch.full_like(images, 2.0))


def test_device_follows_the_images(device):
    images = torch.rand(2, 3, 16, 16, device=device)
    for name in AUGMENTATIONS:
        out = augmented_features(lambda x: x, images, make_augmentation(name), generator=_generator())
        assert out.device == images.device
