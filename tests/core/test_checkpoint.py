"""Checkpoints: safetensors round trips, fmapicon.load from a run folder or a lone file,
and clear errors for what cannot load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import fmapicon
from fmapicon.core.checkpoint import feature_net, read_config, save_weights, weights_file
from fmapicon.errors import UserError
from fmapicon.core.networks import NetworkConfig, UnitFeatures, build_network

NETWORK = NetworkConfig(net="short", channels=8, lambda_init=7.0, center=True, size=(16, 16))


def _trained_like_net(seed: int = 0):
    """A net whose every parameter and buffer differs from a fresh one (as after training)."""
    torch.manual_seed(seed)
    net = build_network(NETWORK)
    with torch.no_grad():
        for tensor in list(net.parameters()) + list(net.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * 0.1 + tensor)
            else:
                tensor.fill_(7)  # BatchNorm's num_batches_tracked
    return net


def _config() -> dict:
    return {"network": {**NETWORK.__dict__, "size": list(NETWORK.size)}, "input_scale": 0.25, "net": "short"}


def _run_folder(tmp_path, net):
    """A run folder as fmapicon.train writes it: config.json and checkpoints/last.safetensors."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(_config()))
    save_weights(net, run / "checkpoints" / "last.safetensors", {"step": 3})
    return run


def _assert_same_state(net, model):
    expected, loaded = net.state_dict(), feature_net(model).state_dict()
    assert expected.keys() == loaded.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, loaded[name]), name


def test_load_round_trips_a_run_folder_exactly(tmp_path):
    net = _trained_like_net()
    model = fmapicon.load(_run_folder(tmp_path, net))
    _assert_same_state(net, model)
    assert isinstance(model, UnitFeatures) and not model.training
    assert (model.stride, model.channels) == (1, 8)
    assert model.config["input_scale"] == 0.25
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        expected = UnitFeatures(net.eval())(images)
        features = model(images)
    assert torch.equal(features, expected)
    assert torch.allclose(features.norm(dim=1), torch.ones(2, 16, 16), atol=1e-5)


def test_pixel_center_running_mean_is_saved(tmp_path):
    net = _trained_like_net()
    model = fmapicon.load(_run_folder(tmp_path, net))
    assert torch.equal(feature_net(model).pixel_center.running_mean, net.pixel_center.running_mean)
    assert net.pixel_center.running_mean.abs().sum() > 0


def test_a_lone_file_loads_from_its_embedded_config(tmp_path):
    net = _trained_like_net(seed=1)
    file = tmp_path / "elsewhere" / "weights.safetensors"
    save_weights(net, file, {"fmapicon_config": json.dumps(_config())})
    model = fmapicon.load(file)
    _assert_same_state(net, model)
    assert model.config["network"]["lambda_init"] == 7.0


def test_a_file_in_its_run_folder_finds_config_two_levels_up(tmp_path):
    net = _trained_like_net()
    run = _run_folder(tmp_path, net)
    model = fmapicon.load(run / "checkpoints" / "last.safetensors")
    _assert_same_state(net, model)


def test_load_unwraps_the_wrappers_when_saving(tmp_path):
    net = _trained_like_net()
    save_weights(UnitFeatures(net), tmp_path / "w.safetensors", {"fmapicon_config": json.dumps(_config())})
    _assert_same_state(net, fmapicon.load(tmp_path / "w.safetensors"))


def test_load_puts_the_model_on_the_device_asked_for(tmp_path, device):
    model = fmapicon.load(_run_folder(tmp_path, _trained_like_net()), device=device)
    assert all(p.device.type == device.type for p in model.parameters())


def test_missing_best_and_missing_config_are_clear_errors(tmp_path):
    run = _run_folder(tmp_path, _trained_like_net())
    with pytest.raises(UserError, match="best.safetensors"):
        fmapicon.load(run, which="best")
    lone = tmp_path / "lone.safetensors"
    shutil.copy(run / "checkpoints" / "last.safetensors", lone)
    with pytest.raises(UserError, match="no config"):
        read_config(lone)


def test_not_a_checkpoint_is_refused(tmp_path):
    pickle_file = tmp_path / "net.pt"
    torch.save({"x": torch.zeros(1)}, pickle_file)
    with pytest.raises(UserError, match="only safetensors"):
        fmapicon.load(pickle_file)
    truncated = tmp_path / "bad.safetensors"
    truncated.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="not a readable safetensors"):
        fmapicon.load(truncated)
    with pytest.raises(UserError, match="not found"):
        weights_file(tmp_path / "nothing_here.safetensors")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    run = _run_folder(tmp_path, _trained_like_net())
    config = _config()
    config["network"]["channels"] = 16
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not match"):
        fmapicon.load(run)


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    net = _trained_like_net()
    target = tmp_path / "w.safetensors"
    save_weights(net, target, {"step": 1})
    first = target.read_bytes()
    save_weights(net, target, {"step": 2})
    assert target.read_bytes() != first
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def _rewritten(run, change):
    """The run's weights rewritten with ``change(tensors)`` applied (same metadata)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    file = run / "checkpoints" / "last.safetensors"
    with safe_open(str(file), "pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    change(tensors)
    save_file(tensors, str(file), metadata=metadata)
    return run


@pytest.mark.parametrize("value, dtype", [(float("nan"), torch.float32), (float("inf"), torch.float16)])
def test_a_non_finite_buffer_is_refused_naming_the_file_and_the_tensor(tmp_path, value, dtype):
    def poison(tensors):
        name = next(k for k in sorted(tensors) if k.endswith("running_var"))
        tensors[name] = tensors[name].to(dtype)
        tensors[name][0] = value
        poison.name = name

    run = _rewritten(_run_folder(tmp_path, _trained_like_net()), poison)
    with pytest.raises(UserError, match="NaN and .* infinite") as error:
        fmapicon.load(run)
    message = str(error.value)
    assert poison.name in message and "last.safetensors" in message and "\n" not in message


def test_a_missing_or_unexpected_tensor_is_refused_in_one_line(tmp_path):
    run = _run_folder(tmp_path, _trained_like_net())
    dropped = sorted(build_network(NETWORK).state_dict())[0]
    _rewritten(run, lambda tensors: tensors.pop(dropped))
    with pytest.raises(UserError, match=f"missing tensors 1: {dropped}") as error:
        fmapicon.load(run)
    assert "\n" not in str(error.value)
    _rewritten(run, lambda tensors: tensors.update({dropped: torch.zeros(1), "extra.weight": torch.zeros(2)}))
    with pytest.raises(UserError, match="unexpected tensors 1: extra.weight") as error:
        fmapicon.load(run)
    assert f"{dropped} (1,)" in str(error.value) and "\n" not in str(error.value)


def test_a_config_that_describes_no_network_is_refused(tmp_path):
    run = _run_folder(tmp_path, _trained_like_net())
    (run / "config.json").write_text(json.dumps({"network": {**_config()["network"], "net": "no-such-net"}}))
    with pytest.raises(UserError, match="config.json|config of"):
        fmapicon.load(run)
    (run / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        fmapicon.load(run)
