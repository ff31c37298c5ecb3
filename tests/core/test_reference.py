"""The shipped ``reference`` model: loads offline by name, from Python and the command line."""

from __future__ import annotations

import json

import pytest
import torch

import fmapicon
from fmapicon.core.checkpoint import SHIPPED_MODELS, shipped_model_file
from fmapicon.cli import main
from fmapicon.train import RECIPE_VALUES


def test_reference_ships_in_the_package_within_the_size_limit():
    file = shipped_model_file("reference")
    assert file is not None and file.is_file(), "src/fmapicon/weights/reference.safetensors is missing"
    assert file.stat().st_size <= 10 * 2**20
    assert set(SHIPPED_MODELS) == {"reference"}


def test_reference_loads_offline_with_its_recipe_and_input_scale():
    model = fmapicon.load("reference")
    config = model.config
    assert config["recipe"] == "reference"
    assert {key: config[key] for key in RECIPE_VALUES["reference"] if key != "steps"} == \
        {key: value for key, value in RECIPE_VALUES["reference"].items() if key != "steps"}
    assert 0.3 < config["input_scale"] < 0.7  # near half of a 480p frame, as trained
    assert model.stride == 4 and not model.training
    images = torch.rand(2, 3, 96, 136)
    with torch.no_grad():
        features = model(images)
    assert features.shape == (2, 64, 24, 34)
    assert torch.allclose(features.norm(dim=1), torch.ones(2, 24, 34), atol=1e-4)
    assert torch.isfinite(features).all()


def test_reference_features_tell_content_apart_from_position():
    """The shipped features follow content: the same crop seen at two places in a frame
    matches itself better than what lies at its old place."""
    from fmapicon.evaluation.features import extract, load_model

    model = load_model("reference")
    torch.manual_seed(0)
    texture = torch.nn.functional.interpolate(torch.rand(1, 3, 24, 24), size=(96, 96), mode="bilinear",
                                              align_corners=False)
    moved = torch.roll(texture, shifts=(16, 24), dims=(-2, -1))
    fa, fb = (extract(model, image, scale=1.0, stride=4) for image in (texture, moved))
    # cell (y, x) of A is at (y + 4, x + 6) in B: compare inside the region away from the seams
    a = fa[0, :, 4:16, 4:14]
    same_content = (a * fb[0, :, 8:20, 10:20]).sum(0).mean()
    same_place = (a * fb[0, :, 4:16, 4:14]).sum(0).mean()
    assert same_content > same_place + 0.1


def test_eval_and_match_take_the_reference_by_name(tmp_path, synth_root):
    out = tmp_path / "ev"
    assert main(["eval", "--davis", str(synth_root), "--model", "reference", "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "eval.json").read_text())
    assert record["jf_mean"] is not None and 0.0 <= record["jf_mean"] <= 1.0
    frames = sorted((synth_root / "JPEGImages" / "480p").iterdir())[0]
    a, b = sorted(frames.iterdir())[:2]
    assert main(["match", str(a), str(b), "--model", "reference", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "flow_ab.flo").is_file()


def test_a_folder_named_like_a_shipped_model_is_reached_with_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reference").mkdir()
    with pytest.raises(fmapicon.errors.UserError, match="checkpoints/last.safetensors"):
        fmapicon.load("./reference")


def _log_p_by_step(run) -> dict:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["log_p"] for line in lines if "log_p" in line}


def test_default_recipe_learns_at_a_small_size(tmp_path):
    """The reference recipe's defaults (resnet-s4, Adam, lambda 4, random crops), only
    smaller, raise log_p within 30 steps on synthetic video (about 45 s of one core)."""
    run = tmp_path / "run"
    assert main(["train", "--data", "synth:scenes=4,frames=24,size=128", "--out", str(run), "--size", "64",
                 "--batch", "8", "--steps", "30", "--log-every", "1", "--workers", "0", "--device", "cpu",
                 "--no-progress"]) == 0
    log_p = _log_p_by_step(run)
    assert sum(log_p[s] for s in range(26, 31)) / 5 > log_p[1] + 0.3, log_p


@pytest.mark.slow
def test_fmapicon_train_with_no_other_flag_raises_log_p_within_100_steps(tmp_path):
    """`fmapicon train --data DIR` with the defaults, on one CPU: log_p at step 100 is above
    log_p at step 1 (about 7 minutes on 2 cores)."""
    from fmapicon.data.synth_layout import write_scenes

    data = tmp_path / "videos"
    write_scenes(data, sequences=4, frames=24, size=(256, 256), objects=3, seed=0)
    run = tmp_path / "run"
    assert main(["train", "--data", str(data / "JPEGImages"), "--out", str(run), "--steps", "100",
                 "--log-every", "1", "--no-progress"]) == 0
    log_p = _log_p_by_step(run)
    assert log_p[100] > log_p[1], (log_p[1], log_p[100])
