"""The strided backbones (resnet-s4, resnet-s8) and the reference recipe that uses them."""

from __future__ import annotations

import math

import pytest
import torch

from fmapicon.core.augment import make_augmentation, roll
from fmapicon.core.networks import NETS, build_network, feature_size, net_stride
from fmapicon.core.resnet import StridedResNet
from fmapicon.train.config import NETS as TRAIN_NETS


@pytest.mark.parametrize("stride", [4, 8])
@pytest.mark.parametrize("size", [(64, 64), (61, 97), (5, 3)])
def test_output_is_at_the_stride_with_ceil_sides(stride, size):
    net = StridedResNet(stride, out_channels=16).eval()
    out = net(torch.rand(2, 3, *size))
    assert out.shape == (2, 16, math.ceil(size[0] / stride), math.ceil(size[1] / stride))


def test_every_parameter_gets_a_gradient():
    net = StridedResNet(4, out_channels=8)
    net(torch.rand(2, 3, 48, 40)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_bad_stride_is_refused():
    with pytest.raises(ValueError, match="stride"):
        StridedResNet(2)


def test_names_agree_between_the_torch_free_config_and_the_networks():
    assert TRAIN_NETS == NETS
    assert [net_stride(n) for n in ("short", "resnet-s4", "resnet-s8")] == [1, 4, 8]
    assert feature_size(128, "resnet-s4") == 32 and feature_size(130, "resnet-s8") == 17


@pytest.mark.parametrize("net", ["resnet-s4", "resnet-s8"])
def test_pixel_center_is_sized_to_the_feature_map(net):
    from fmapicon.core.networks import network_config
    from fmapicon.train import TrainConfig

    model = build_network(network_config(TrainConfig(net=net, size=64).to_dict()))
    side = 64 // net_stride(net)
    assert model.stride == net_stride(net)
    assert tuple(model.pixel_center.running_mean.shape[-2:]) == (side, side)
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 64, side, side)


@pytest.mark.parametrize("stride", [4, 8])
def test_roll_round_trip_at_the_backbones_stride(stride):
    """roll -> network -> un-roll returns exactly the network's features of the un-rolled
    image when the network commutes with rolls by multiples of its stride (here the
    backbone's own cell grid: a stride-s average pool with circular structure), and the
    shifts are multiples of the stride."""
    augmentation = make_augmentation("roll", stride=stride)
    images = torch.rand(3, 3, 8 * stride, 6 * stride)
    pool = torch.nn.AvgPool2d(stride)  # commutes with rolls by multiples of the stride
    draw = augmentation.sample(3, *images.shape[-2:], device="cpu", generator=torch.Generator().manual_seed(1))
    assert torch.all(draw.parts[0].steps_y >= 0) if hasattr(draw, "parts") else True
    assert torch.allclose(draw.unwarp(pool(draw.warp(images))), pool(images), atol=1e-6)
    # the shift really is applied, in whole cells of the stride
    shifted = pool(draw.warp(images))
    expected = roll(pool(images), draw.steps_y, draw.steps_x)
    assert torch.allclose(shifted, expected, atol=1e-6)


def test_four_draws_with_a_strided_backbone_train_the_objective():
    """A few steps of the real objective through resnet-s4 with roll+affine raise log_p."""
    from fmapicon.core.augment import four_draws
    from fmapicon.core.objective import log_p

    torch.manual_seed(0)
    net = build_network(net="resnet-s4", channels=16, size=(8, 8), lambda_init=4.0)
    augmentation = make_augmentation("roll+affine", stride=net.stride)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    base = torch.rand(4, 3, 32, 32)
    a, b = base, torch.roll(base, 4, dims=-1)  # B: A moved by one cell
    generator = torch.Generator().manual_seed(0)
    values = []
    for _ in range(40):
        loss = -log_p(*four_draws(net, a, b, augmentation, generator=generator)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values.append(-loss.item())
    assert sum(values[-5:]) / 5 > sum(values[:5]) / 5 + 0.3, values
