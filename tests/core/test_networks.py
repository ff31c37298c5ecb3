"""The networks: U-Net shapes for every preset at odd and even sizes, NormScale,
PixelCenter in training, evaluation, at other resolutions and under torch.distributed
(gloo), FeatureNet / UnitFeatures, build_network, and a strided backbone with the four
draws."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fmapicon.core.augment import four_draws, make_augmentation
from fmapicon.errors import UserError
from fmapicon.core.networks import (
    PRESETS,
    FeatureNet,
    NetworkConfig,
    NormScale,
    PixelCenter,
    UNet,
    UnitFeatures,
    build_network,
    calibrate_pixel_center,
)

# --------------------------------------------------------------------------- U-Net


def test_presets_are_the_originals():
    assert PRESETS["short"] == ([3, 64, 64, 128, 256], [64, 64, 128, 512])
    assert PRESETS["tall"] == ([3, 64, 64, 128, 256, 512], [64, 64, 128, 256, 256])
    assert PRESETS["taller"] == ([3, 64, 64, 128, 256, 512, 512, 512], [64, 64, 128, 256, 256, 512, 512])


# taller (38 M parameters, 7 levels) stays at the smaller sizes to keep the test fast
_SIZES = {"short": [(33, 47), (64, 64), (120, 120), (5, 3)],
          "tall": [(33, 47), (64, 64), (120, 120), (5, 3)],
          "taller": [(33, 47), (64, 64), (5, 3)]}


@pytest.mark.parametrize("preset", ["short", "tall", "taller"])
def test_unet_output_is_full_resolution_at_odd_and_even_sizes(preset):
    torch.manual_seed(0)
    net = UNet(*PRESETS[preset], out_channels=16).eval()
    for size in _SIZES[preset]:
        with torch.no_grad():
            out = net(torch.rand(1, 3, *size))
        assert out.shape == (1, 16, *size)
        assert torch.isfinite(out).all()


def test_unet_trains_at_an_odd_size_and_every_parameter_gets_gradient():
    torch.manual_seed(0)
    net = UNet([3, 8, 8, 16], [8, 8, 16], out_channels=4).train()
    out = net(torch.rand(2, 3, 21, 19))
    assert out.shape == (2, 4, 21, 19)
    out.square().mean().backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_unet_down_level_adds_the_pooled_input_with_zero_channels_in_front():
    """With the down convolution zeroed, level 0 passes avg_pool(x) into the last 3 of its
    channels and zeros into the others: the average-pooled residual, ceil mode."""
    net = UNet([3, 5], [4], out_channels=2)
    nn.init.zeros_(net.down[0].weight)
    nn.init.zeros_(net.down[0].bias)
    seen = {}
    net.up[0].register_forward_hook(lambda module, args, out: seen.update(input=args[0]))
    x = torch.rand(1, 3, 7, 9)
    net(x)
    expected = F.leaky_relu(F.avg_pool2d(x, 2, ceil_mode=True))
    assert seen["input"].shape == (1, 5, 4, 5)
    torch.testing.assert_close(seen["input"][:, 2:], expected)
    assert seen["input"][:, :2].abs().max() == 0


def test_unet_rejects_mismatched_channel_lists():
    with pytest.raises(ValueError, match="L \\+ 1"):
        UNet([3, 8, 8], [8, 8, 8])


# --------------------------------------------------------------------------- NormScale


def test_norm_scale_gives_norm_lambda_and_lambda_learns():
    norm_scale = NormScale(12.0)
    x = torch.randn(2, 7, 5, 6)
    out = norm_scale(x)
    torch.testing.assert_close(out.norm(dim=1), torch.full((2, 5, 6), 12.0))
    assert norm_scale.lambda_ == 12.0 and isinstance(norm_scale.lambda_, float)
    out.sum().backward()
    assert norm_scale.scale.grad is not None and norm_scale.scale.grad.abs() > 0
    # d/d lambda of sum(out) is sum(x / |x|)
    torch.testing.assert_close(norm_scale.scale.grad, (x / x.norm(dim=1, keepdim=True)).sum(), rtol=1e-4, atol=1e-4)
    assert set(norm_scale.state_dict()) == {"scale"}


def test_norm_scale_of_zero_features_is_zero_with_finite_gradient():
    x = torch.zeros(1, 4, 2, 2, requires_grad=True)
    NormScale()(x).sum().backward()
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- PixelCenter


def test_pixel_center_training_subtracts_the_batch_mean_and_updates_the_running_mean():
    center = PixelCenter(4, (6, 5)).train()
    first, second = torch.randn(3, 4, 6, 5) + 2, torch.randn(3, 4, 6, 5) - 1
    out = center(first)
    torch.testing.assert_close(out.mean(dim=0), torch.zeros(4, 6, 5), rtol=0, atol=1e-6)
    torch.testing.assert_close(center.running_mean, 0.1 * first.mean(0, keepdim=True))
    center(second)
    expected = 0.9 * 0.1 * first.mean(0, keepdim=True) + 0.1 * second.mean(0, keepdim=True)
    torch.testing.assert_close(center.running_mean, expected)
    assert not center.running_mean.requires_grad


def test_pixel_center_gradient_is_the_centred_upstream_gradient():
    center = PixelCenter(3, (4, 4)).train()
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    weight = torch.randn(5, 3, 4, 4)
    (center(x) * weight).sum().backward()
    torch.testing.assert_close(x.grad, weight - weight.mean(0, keepdim=True))


def test_pixel_center_eval_subtracts_the_running_mean():
    center = PixelCenter(4, (6, 5))
    center(torch.randn(8, 4, 6, 5) + 3)
    running = center.running_mean.clone()
    center.eval()
    x = torch.randn(2, 4, 6, 5)
    torch.testing.assert_close(center(x), x - running)
    assert torch.equal(center.running_mean, running)  # eval leaves it alone


def test_pixel_center_eval_at_another_size_subtracts_only_the_spatial_average():
    torch.manual_seed(0)
    center = PixelCenter(3, (48, 48)).train()
    for _ in range(3):
        center(torch.randn(4, 3, 48, 48) + torch.linspace(0, 1, 48))
    center.eval()
    x = torch.randn(2, 3, 64, 80)
    out = center(x)
    average = center.running_mean.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(out, x - average)
    # the horizontal ramp learned at 48 x 48 is not stretched onto the 64 x 80 frame
    assert center.running_mean[0, 0, 0, -1] - center.running_mean[0, 0, 0, 0] > 0.2
    torch.testing.assert_close((x - out)[..., 0], (x - out)[..., -1])
    # at the training size the whole map is subtracted
    same = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(center(same), same - center.running_mean)
    assert center(torch.randn(1, 3, 1, 2)).shape == (1, 3, 1, 2)  # any size, never raises


def test_pixel_center_training_at_another_size_updates_the_buffer_with_the_resampled_mean():
    center = PixelCenter(2, (8, 8)).train()
    x = torch.randn(3, 2, 12, 10)
    out = center(x)
    torch.testing.assert_close(out, x - x.mean(0, keepdim=True))  # centred at its own size
    expected = 0.1 * F.interpolate(x.mean(0, keepdim=True), size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(center.running_mean, expected)


def test_pixel_center_rejects_the_wrong_channel_count():
    with pytest.raises(ValueError, match="B x 4 x h x w"):
        PixelCenter(4, 8)(torch.zeros(2, 3, 8, 8))


def _distributed_worker(rank, world, init_file, x, weight, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        center = PixelCenter(x.shape[1], tuple(x.shape[-2:]), global_batch=True).train()
        # uneven shards (3 and 2 samples): the global mean must weight samples, not ranks
        part = slice(0, 3) if rank == 0 else slice(3, None)
        # without the switch a process group changes nothing: the mean of this rank's batch
        alone = PixelCenter(x.shape[1], tuple(x.shape[-2:])).train()
        torch.testing.assert_close(alone(x[part]), x[part] - x[part].mean(0, keepdim=True))
        local = x[part].clone().requires_grad_(True)
        out = center(local)
        (out * weight[part]).sum().backward()
        torch.save((out.detach(), local.grad, center.running_mean), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_pixel_center_global_batch_uses_the_mean_of_all_processes(tmp_path):
    """Two gloo processes holding 3 + 2 samples give the outputs, input gradients (of the
    summed loss) and running mean of one process holding all 5."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    x, weight = torch.randn(5, 3, 4, 6), torch.randn(5, 3, 4, 6)
    mp.start_processes(_distributed_worker, args=(2, str(tmp_path / "init"), x, weight, str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    got = {rank: torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)}

    reference = PixelCenter(3, (4, 6)).train()
    whole = x.clone().requires_grad_(True)
    out = reference(whole)
    (out * weight).sum().backward()
    torch.testing.assert_close(torch.cat([got[0][0], got[1][0]]), out.detach())
    torch.testing.assert_close(torch.cat([got[0][1], got[1][1]]), whole.grad)
    for rank in (0, 1):
        torch.testing.assert_close(got[rank][2], reference.running_mean)


# --------------------------------------------------------------------------- FeatureNet, UnitFeatures, build_network


def test_build_network_default_state_dict_keys_and_output():
    net = build_network(channels=8, size=(12, 10))
    keys = net.state_dict().keys()
    assert "norm_scale.scale" in keys and "pixel_center.running_mean" in keys
    assert net.pixel_center.running_mean.shape == (1, 8, 12, 10)
    assert net.stride == 1 and net.channels == 8 and net.lambda_ == 12.0
    out = net.train()(torch.rand(2, 3, 12, 10))
    assert out.shape == (2, 8, 12, 10)
    # the 1e-6 in |x| + 1e-6 matters where centred features are small
    torch.testing.assert_close(out.norm(dim=1), torch.full((2, 12, 10), 12.0), rtol=1e-4, atol=0)


def test_build_network_order_is_center_then_normalize():
    net = build_network(NetworkConfig(channels=4, size=(9, 9), lambda_init=3.0)).train()
    images = torch.rand(2, 3, 9, 9)
    features = net.backbone(images)
    # BatchNorm in training mode is deterministic for the same batch
    expected = NormScale(3.0)(features - features.mean(0, keepdim=True))
    torch.testing.assert_close(net(images), expected)


def test_build_network_without_center_and_with_each_preset():
    net = build_network(center=False, channels=4, net="tall")
    assert net.pixel_center is None and "pixel_center.running_mean" not in net.state_dict()
    assert [conv.out_channels for conv in net.backbone.down] == PRESETS["tall"][0][1:]
    assert len(build_network(net="taller", channels=4).backbone.up) == 7


def test_build_network_errors_name_what_is_valid():
    """API misuse: ValueError / TypeError, not the command line's UserError."""
    with pytest.raises(ValueError, match="short, tall, taller"):
        build_network(net="huge")
    with pytest.raises(TypeError, match="lambda_init"):
        build_network(lamda_init=3.0)
    with pytest.raises(ValueError, match="channels"):
        build_network(channels=0)


def test_unit_features_are_unit_norm_and_pass_attributes_through():
    net = build_network(channels=6, size=(10, 10), lambda_init=5.0)
    unit = UnitFeatures(net).eval()
    with torch.no_grad():
        out = unit(torch.rand(1, 3, 14, 11))
    assert out.shape == (1, 6, 14, 11)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(1, 14, 11))
    assert (unit.stride, unit.channels, unit.lambda_) == (1, 6, 5.0)
    assert set(unit.state_dict()) == {f"net.{key}" for key in net.state_dict()}


class _StridedBackbone(nn.Module):
    """A stride-4 backbone without stride or channels attributes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, kernel_size=4, stride=4)

    def forward(self, x):
        return self.conv(x)


def test_a_strided_backbone_works_with_the_four_draws():
    torch.manual_seed(0)
    net = FeatureNet(_StridedBackbone(), PixelCenter(5, (8, 8)), NormScale())
    assert (net.stride, net.channels) == (4, 5)  # probed
    augmentation = make_augmentation("roll+affine", stride=net.stride)
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    features = four_draws(net.train(), a, b, augmentation, generator=torch.Generator().manual_seed(0))
    assert [tuple(f.shape) for f in features] == [(2, 5, 8, 8)] * 4
    sum(f.sum() for f in features).backward()
    assert net.backbone.conv.weight.grad.abs().sum() > 0 and net.norm_scale.scale.grad is not None


def test_feature_net_with_a_roll_only_strided_backbone_is_equivariant():
    """A patchwise (stride-4, kernel-4) network is exactly equivariant to rolls by multiples
    of 4, so every roll draw returns the un-augmented features."""
    net = FeatureNet(_StridedBackbone(), None, NormScale())
    a = torch.rand(3, 3, 24, 32)
    draws = four_draws(net, a, a, make_augmentation("roll", stride=4), generator=torch.Generator().manual_seed(1))
    for features in draws:
        torch.testing.assert_close(features, net(a))


def test_feature_net_refuses_a_center_with_other_channels():
    with pytest.raises(ValueError, match="PixelCenter"):
        FeatureNet(_StridedBackbone(), PixelCenter(7, (8, 8)), NormScale())


def test_pixel_center_calibration_recovers_the_positional_component():
    """A backbone = a fixed positional pattern P + a zero-mean image term: after calibration on frames
    whose image terms cancel, the running mean is exactly P, and eval features are the image term alone."""
    import torch
    from torch import nn


    class Positional(nn.Module):
        stride, channels = 1, 4

        def __init__(self):
            super().__init__()
            self.pattern = nn.Parameter(torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(0)) * 10)

        def forward(self, x):
            pattern = torch.nn.functional.interpolate(self.pattern, size=x.shape[-2:]) if x.shape[-1] != 6 else self.pattern
            return pattern + (x.mean(1, keepdim=True) - 0.5).expand(-1, 4, -1, -1)

    net = FeatureNet(Positional(), PixelCenter(4, (6, 6)), NormScale(1.0), stride=1, channels=4)
    frames = torch.rand(5, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    frames = torch.cat([frames, 1 - frames])  # image terms cancel over the set
    assert calibrate_pixel_center(net, frames, batch=3)
    assert torch.allclose(net.pixel_center.running_mean, net.backbone.pattern, atol=1e-5)
    assert net.training  # restored
    no_centre = FeatureNet(Positional(), None, NormScale(1.0), stride=1, channels=4)
    assert not calibrate_pixel_center(no_centre, frames)
    with pytest.raises(ValueError, match="training size"):
        calibrate_pixel_center(net, torch.rand(2, 3, 8, 8))


# --------------------------------------------------------------------------- network_config


def test_a_run_config_gives_one_network_config_wherever_it_is_built(tmp_path):
    """The training side (a TrainConfig's keys, S the training side), the saved side (the
    resolved config's ``network`` entry) and a config that only has TrainConfig keys (a file
    whose metadata lost its ``network`` entry) all give PixelCenter the feature map's size:
    32 x 32 for the reference recipe's 128 x 128 crops at stride 4."""
    import dataclasses

    from fmapicon.core.checkpoint import load, save_weights
    from fmapicon.core.networks import network_config
    from fmapicon.train import TrainConfig

    run_config = TrainConfig().to_dict()
    trained = network_config(run_config)
    assert trained.size == (32, 32) and trained.net == "resnet-s4"
    saved = {**run_config, "network": dataclasses.asdict(trained)}
    assert network_config(saved) == trained == network_config(json.loads(json.dumps(saved)))
    for config in (saved, run_config):
        file = save_weights(build_network(trained), tmp_path / "w.safetensors",
                            {"fmapicon_config": json.dumps(config)})
        assert tuple(load(file).net.pixel_center.running_mean.shape[-2:]) == (32, 32)


def test_network_config_refuses_what_it_cannot_build():
    """A file's config that names a removed option, an unknown key or a bad preset is a
    UserError naming the source; an off removed option (an older run's config) still loads."""
    from fmapicon.core.networks import network_config

    base = {"net": "resnet-s4", "channels": 8, "lambda_init": 4.0, "center": True, "size": 64}
    assert network_config({**base, "pixels_weight": 0.0}).size == (16, 16)
    for bad, message in ((dict(pixels_weight=0.5), "pixels_weight=0.5"), (dict(net="huge"), "huge")):
        with pytest.raises(UserError, match=message) as info:
            network_config({**base, **bad}, source="the config of w.safetensors")
        assert "w.safetensors" in str(info.value)
    with pytest.raises(UserError, match="unknown key"):
        network_config({"network": {**base, "size": [16, 16], "depth": 3}})
