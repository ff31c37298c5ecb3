"""Training: the config and its sources, the run folder, learning on synthetic scenes,
the positional-code diagnostic, resume, faults (NaN, SIGTERM, disk) and torchrun.

Runs are tiny (16 x 16 frames, batch 4, a few steps) and use one torch thread: on a
shared 2-core machine a second OpenMP thread makes each step many times slower.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fmapicon
from fmapicon.core import objective
from fmapicon.core.networks import network_config
from fmapicon.cli import build_parser
from fmapicon.cli.train import config_from_args
from fmapicon.data.pairs import FramePairs
from fmapicon.errors import UserError
from fmapicon.runtime import has_module
from fmapicon.train import RECIPE_VALUES, TrainConfig, TrainingDiverged, saved_config, train
from fmapicon.train.data_stream import GlobalBatches
from fmapicon.train.distributed import init_processes
from fmapicon.train.loop import Trainer
from fmapicon.train.run_folder import prepare_run_folder

TINY = dict(size=16, channels=16, batch=4, workers=0, device="cpu", log_every=1, save_every=2)
KEYS = {"step", "loss", "log_p", "log_p_shuffled", "lambda", "lr", "grad_norm", "pairs_per_s", "bad_steps"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig.for_recipe("original"), **{**TINY, **changes})


def read_metadata(file: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return handle.metadata()


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory) -> Path:
    """One uninterrupted tiny run of 4 steps (shared by several tests)."""
    torch.set_num_threads(1)
    return train(tiny(steps=4), tmp_path_factory.mktemp("runs") / "four", progress=False)


# --------------------------------------------------------------------------- config


def test_defaults_are_the_reference_recipe_and_original_is_one_option_away():
    config = TrainConfig()
    assert config.recipe == "reference"
    assert {key: getattr(config, key) for key in RECIPE_VALUES["reference"]} == RECIPE_VALUES["reference"]
    assert TrainConfig.from_mapping({"recipe": "original", "batch": 8}).net == "short"
    assert TrainConfig.from_mapping({"recipe": "original", "batch": 8}).batch == 8


def test_original_recipe():
    config = TrainConfig.for_recipe("original")
    assert (config.net, config.channels, config.size, config.batch, config.max_gap) == ("short", 64, 120, 64, 30)
    assert (config.aug, config.center, config.lambda_init, config.log_eps) == ("roll+affine", True, 12.0, 1e-4)
    assert (config.optim, config.lr, config.clip, config.amp) == ("rmsprop", 1e-3, 20.0, "off")
    assert config.grad_accumulation == "off" and config.data == ["synth"]


def test_unknown_config_key_lists_the_valid_ones():
    with pytest.raises(UserError, match=r"unknown training option\(s\) batchsize.*valid keys: recipe, data, net"):
        TrainConfig.from_mapping({"batchsize": 3})


@pytest.mark.parametrize("key, value", [("batch", 0), ("aug", "flip"), ("lr", -1.0), ("lr", float("nan")),
                                        ("device", "tpu"), ("center", "yes"), ("steps", 2.5), ("data", []),
                                        ("clip", -1.0), ("net", "huge")])
def test_bad_values_are_refused(key, value):
    with pytest.raises(UserError, match=key):
        TrainConfig.from_mapping({key: value})


def test_eval_needs_a_davis_root():
    with pytest.raises(UserError, match="davis"):
        TrainConfig(eval_every=10).validate()


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--aug", "flip"], ["--lr", "fast"], ["--clip", "-2"],
                                  ["--device", "tpu"], ["--config", "run.yaml"], ["--steps", "1.5"]])
def test_bad_flags_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", *argv])
    assert exit_info.value.code == 2
    assert "error: argument" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_flags_override_the_config_file_which_overrides_defaults(tmp_path, suffix):
    file = tmp_path / f"run{suffix}"
    if suffix == ".toml":
        file.write_text('batch = 8\nlr = 0.01\nmax-gap = 5\ncenter = false\ndata = ["synth"]\n')
    else:
        file.write_text(json.dumps({"batch": 8, "lr": 0.01, "max_gap": 5, "center": False, "data": "synth"}))
    args = build_parser().parse_args(["train", "--config", str(file), "--batch", "4", "--center", "--out", "x"])
    config, out, resume = config_from_args(args)
    assert (config.batch, config.lr, config.max_gap, config.center) == (4, 0.01, 5, True)
    assert config.size == 128 and out == "x" and not resume


def test_recipe_original_from_the_config_file_or_a_flag_changes_the_base(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text('recipe = "original"\nbatch = 8\n')
    from_file, _, _ = config_from_args(build_parser().parse_args(["train", "--config", str(file)]))
    from_flag, _, _ = config_from_args(build_parser().parse_args(["train", "--recipe", "original", "--batch", "8"]))
    for config in (from_file, from_flag):
        assert (config.recipe, config.net, config.size, config.lambda_init, config.batch) == \
            ("original", "short", 120, 12.0, 8)


def test_crop_range_reaches_the_dataset_and_is_checked():
    from fmapicon.train.data_stream import make_dataset

    args = build_parser().parse_args(["train", "--data", "synth:scenes=1,frames=4,size=64", "--crop", "random",
                                      "--crop-min", "0.2", "--crop-max", "0.3", "--size", "16"])
    config, _, _ = config_from_args(args)
    dataset = make_dataset(config)
    assert dataset.crop_scale == (0.2, 0.3)
    import numpy as np

    x0, y0, x1, y1 = dataset._crop_box(np.random.default_rng(0), 100, 50)
    assert 0.2 * 50 - 1e-9 <= (x1 - x0) * 100 <= 0.3 * 50 + 1e-9  # the side is 20-30 % of the short side
    for bad in (dict(crop_min=0.5, crop_max=0.4), dict(crop_max=1.5), dict(crop_min=0.0)):
        with pytest.raises(UserError, match="crop"):
            TrainConfig.from_mapping(bad)


@pytest.mark.parametrize("key, value", [("weighting", "clips"), ("pixels_weight", 0.5), ("home_radius", 1),
                                        ("color_jitter", 0.5)])
def test_removed_options_are_refused_with_a_reason_not_ignored(tmp_path, key, value, capsys):
    """An options file, a saved run config and a flag that ask for a removed option are each
    refused naming it (never silently trained without it); an older run's config that holds
    the option's "off" value still loads, as the same run."""
    with pytest.raises(UserError, match=f"{key}={value!r}.*no longer exist.*docs/experiments.md"):
        TrainConfig.from_mapping({key: value})
    off = {"weighting": "frames", "pixels_weight": 0.0, "home_radius": 0, "color_jitter": 0.0}[key]
    assert TrainConfig.from_mapping({key: off, "batch": 4}) == TrainConfig.from_mapping({"batch": 4})
    file = tmp_path / "old.json"
    file.write_text(json.dumps({key: value}))
    args = build_parser().parse_args(["train", "--config", str(file)])
    with pytest.raises(UserError, match=key):
        config_from_args(args)
    args = build_parser().parse_args(["train", "--" + key.replace("_", "-"), str(value)])
    with pytest.raises(UserError, match="--" + key.replace("_", "-") + ".*no longer exist"):
        config_from_args(args)


def test_random_crop_runs_record_the_scale_of_their_crops(tmp_path):
    """Crops of 20-30% of a 64-pixel synthetic frame shown at 16 pixels: the network sees the
    scene at 16 / (64 x sqrt(0.2 x 0.3)) = 1.02 of its size, not the centre crop's 0.25."""
    run = train(tiny(steps=1, data=["synth:scenes=2,frames=4,size=64"], crop="random", crop_min=0.2, crop_max=0.3),
                tmp_path / "run", progress=False)
    recorded = json.loads((run / "config.json").read_text())["input_scale"]
    assert recorded == pytest.approx(16 / (64 * (0.2 * 0.3) ** 0.5))
    from fmapicon.evaluation.features import load_model

    assert load_model(str(run)).default_input_scale == pytest.approx(recorded)  # what eval and match use


def test_config_file_with_an_unknown_key_is_refused(tmp_path):
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"batch": 8, "learning_rate": 0.1}))
    args = build_parser().parse_args(["train", "--config", str(file)])
    with pytest.raises(UserError, match="learning_rate.*valid keys"):
        config_from_args(args)


def test_resume_accepts_only_steps_device_workers(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**tiny(steps=4).to_dict(), "input_scale": 0.5}))
    args = build_parser().parse_args(["train", "--resume", str(run), "--steps", "9", "--workers", "1"])
    config, out, resume = config_from_args(args)
    assert (config.steps, config.workers, config.size, out, resume) == (9, 1, 16, str(run), True)
    args = build_parser().parse_args(["train", "--resume", str(run), "--lr", "0.1"])
    with pytest.raises(UserError, match="--lr cannot be given"):
        config_from_args(args)


# --------------------------------------------------------------------------- data order


def test_rank_shards_make_up_the_one_process_batches():
    one = GlobalBatches(length=50, batch=8, rank=0, world=1, seed=3).epoch(2)
    shards = [GlobalBatches(50, 8, rank, 4, seed=3).epoch(2) for rank in range(4)]
    assert len(one) == 6 and all(len(shard) == 6 for shard in shards)
    for k, batch in enumerate(one):
        assert sum((shard[k] for shard in shards), []) == batch
    assert GlobalBatches(50, 8, 0, 1, seed=3).epoch(2, start=4) == one[4:]
    assert GlobalBatches(50, 8, 0, 1, seed=3).epoch(3) != one
    with pytest.raises(UserError, match="fewer than one batch"):
        GlobalBatches(3, 8, 0, 1, seed=0)


# --------------------------------------------------------------------------- run folder


def test_run_folder_refusals(tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty.*--force"):
        prepare_run_folder(occupied, resume=False, force=False)
    (occupied / "metrics.jsonl").write_text("{}\n")
    prepare_run_folder(occupied, resume=False, force=True)
    assert sorted(p.name for p in occupied.iterdir()) == ["notes.txt"]  # only run files go
    with pytest.raises(UserError, match="cannot resume"):
        prepare_run_folder(occupied, resume=True, force=False)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="cannot write the run folder"):
        prepare_run_folder(a_file / "run", resume=False, force=False)


def test_full_disk_is_an_error_before_training(tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=5 * 2**20))
    with pytest.raises(UserError, match="only 5 MiB free"):
        train(tiny(steps=2), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.json").exists()


# --------------------------------------------------------------------------- a tiny run


def test_tiny_run_writes_the_run_folder(four_steps):
    lines = metrics(four_steps)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert all(KEYS <= set(line) for line in lines)
    assert all(line["lr"] == 1e-3 and line["pairs_per_s"] > 0 and line["bad_steps"] == 0 for line in lines)
    config = json.loads((four_steps / "config.json").read_text())
    assert config["input_scale"] == FramePairs(["synth"], size=16).input_scale
    assert config["network"] == {"net": "short", "channels": 16, "lambda_init": 12.0, "center": True,
                                 "size": [16, 16]}
    assert config["fmapicon_version"] == fmapicon.__version__ and config["world_size"] == 1
    assert {p.name for p in (four_steps / "checkpoints").iterdir()} == {"last.safetensors", "state.pt"}
    state = torch.load(four_steps / "checkpoints" / "state.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["position"]) == (4, 0, 4)
    if has_module("tensorboard"):
        assert any(p.name.startswith("events.out.tfevents") for p in (four_steps / "tensorboard").iterdir())


def test_snapshot_every_keeps_the_weights_of_those_steps(tmp_path):
    """--snapshot-every 2 over 5 steps keeps steps 2 and 4 (not 0, not 5), each the weights
    of its step, loadable on its own."""
    run = train(tiny(steps=5, save_every=100, snapshot_every=2), tmp_path / "run", progress=False)
    folder = run / "checkpoints"
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-000002.safetensors", "step-000004.safetensors"]
    steps = [read_metadata(folder / name)["step"] for name in ("step-000002.safetensors", "step-000004.safetensors")]
    assert steps == ["2", "4"]
    early, last = fmapicon.load(folder / "step-000002.safetensors"), fmapicon.load(run)
    assert not torch.equal(early.net.backbone.head.weight, last.net.backbone.head.weight)


def test_saved_weights_load_exactly(four_steps):
    """The weights file holds the training weights exactly, and PixelCenter's mean recomputed at
    them on the run's 128 calibration frames; state.pt keeps the live (trailing) training buffer."""
    from fmapicon.core.networks import calibrate_pixel_center

    state = torch.load(four_steps / "checkpoints" / "state.pt", weights_only=True)["model"]
    model = fmapicon.load(four_steps)
    loaded = model.net.state_dict()
    assert state.keys() == loaded.keys()
    centre = "pixel_center.running_mean"
    assert all(torch.equal(state[name], loaded[name]) for name in state if name != centre)
    assert not torch.allclose(state[centre], loaded[centre], atol=1e-3), "the trailing mean was replaced"
    config = tiny(steps=4)
    pairs = FramePairs(config.data, size=config.size, max_gap=config.max_gap, crop=config.crop, seed=config.seed,
                       crop_scale=(config.crop_min, config.crop_max))
    net = model.net
    net.pixel_center.running_mean.zero_()
    assert calibrate_pixel_center(net, pairs.first_frames(128))
    torch.testing.assert_close(net.pixel_center.running_mean, loaded[centre], rtol=1e-5, atol=1e-5)
    calibration = json.loads(read_metadata(four_steps / "checkpoints" / "last.safetensors")["pixel_center_calibration"])
    assert calibration == {"frames": 128, "step": 4}
    assert model.config["input_scale"] > 0 and not model.training


def test_resume_reproduces_the_uninterrupted_run(four_steps, tmp_path):
    run = tmp_path / "resumed"
    train(tiny(steps=2), run, progress=False)
    assert saved_config(run).steps == 2
    train(tiny(steps=4), run, resume=True, progress=False)
    resumed, straight = metrics(run), metrics(four_steps)
    assert [line["step"] for line in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed, straight):  # bitwise: same RNG streams, data position and thread count
        assert (a["loss"], a["log_p"], a["grad_norm"]) == (b["loss"], b["log_p"], b["grad_norm"]), (a, b)
    final = fmapicon.load(run).net.state_dict()
    reference = fmapicon.load(four_steps).net.state_dict()
    assert all(torch.equal(final[k], reference[k]) for k in final)
    train(None, run, resume=True, progress=False)  # its own config: already at its 4 steps
    assert [line["step"] for line in metrics(run)] == [1, 2, 3, 4]
    with pytest.raises(UserError, match="config=None is only for resume"):
        train(None, tmp_path / "other", progress=False)
    with pytest.raises(UserError, match="only steps, device, workers, minutes may change.*lr"):
        train(tiny(steps=6, lr=0.5), run, resume=True, progress=False)


def test_resume_drops_metrics_logged_after_the_checkpoint(four_steps, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(four_steps, run)
    state = torch.load(run / "checkpoints" / "state.pt", weights_only=True)
    with (run / "metrics.jsonl").open("a") as handle:  # a line the killed run wrote after its last save
        handle.write(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    train(tiny(steps=5), run, resume=True, progress=False)
    assert state["step"] == 4 and [line["step"] for line in metrics(run)] == [1, 2, 3, 4, 5]
    assert metrics(run)[-1]["loss"] != 1.0


def test_a_time_budget_ends_the_run_cleanly_and_resume_goes_on(tmp_path):
    run = train(tiny(steps=50, minutes=1e-6, save_every=100), tmp_path / "run", progress=False)
    assert [line["step"] for line in metrics(run)] == [1]  # stopped after one step, its line written
    assert torch.load(run / "checkpoints" / "state.pt", weights_only=True)["step"] == 1
    train(tiny(steps=2, save_every=100), run, resume=True, progress=False)
    assert [line["step"] for line in metrics(run)] == [1, 2]


def test_the_command_says_how_many_steps_were_done_and_why(tmp_path, capsys):
    from fmapicon.cli import main

    argv = ["train", "--out", str(tmp_path / "run"), "--data", "synth:scenes=2,frames=4", "--size", "16",
            "--channels", "16", "--batch", "4", "--workers", "0", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--steps", "50", "--minutes", "0.000001"]) == 0
    assert "done, 1 of 50 steps (the --minutes 1e-06 budget ended it)" in capsys.readouterr().out
    assert main(["train", "--resume", str(tmp_path / "run"), "--steps", "2", "--no-progress"]) == 0
    assert "done, 2 of 2 steps; run folder" in capsys.readouterr().out


def test_bf16_autocast_trains_and_fp16_needs_cuda(tmp_path):
    lines = metrics(train(tiny(steps=2, amp="bf16", save_every=100), tmp_path / "run", progress=False))
    assert all(line["loss"] > 0 and line["log_p"] < 0 for line in lines)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="fp16 needs a CUDA device"):
            train(tiny(steps=2, amp="fp16"), tmp_path / "fp16", progress=False)
        assert not (tmp_path / "fp16").exists()


# --------------------------------------------------------------------------- learning


@pytest.mark.parametrize("aug", ["roll+affine"])
def test_tiny_run_on_synthetic_scenes_learns(tmp_path, aug):
    """The final recipe on synthetic scenes: within 16 steps log_p
    rises well above its start, and true pairs score well above shuffled pairs (they did not
    at the start). Each step logs one batch of 4 pairs, and a hard batch drops log_p by 20-40
    nats for a step, so the last steps are summed up by their median: a mean of six swings
    with which CPU's float rounding the run takes."""
    import statistics

    lines = metrics(train(tiny(steps=16, save_every=100, aug=aug), tmp_path / "run", progress=False))
    first = sum(line["log_p"] for line in lines[:2]) / 2
    last = statistics.median(line["log_p"] for line in lines[-6:])
    gap_first = lines[0]["log_p"] - lines[0]["log_p_shuffled"]
    gap_last = statistics.median(line["log_p"] - line["log_p_shuffled"] for line in lines[-6:])
    assert last > first + 4, (first, last)
    assert gap_last > 5 and gap_last > gap_first + 4, (gap_first, gap_last)


def test_learn_lambda_reaches_the_optimizer(tmp_path):
    """Probe: with --no-learn-lambda lambda stays exactly at --lambda-init while the default
    run moves it; the minimized loss is -log_p (eps 0) on the same features."""
    plain = metrics(train(tiny(steps=2, save_every=100, log_eps=0.0), tmp_path / "plain", progress=False))
    fixed = metrics(train(tiny(steps=2, save_every=100, learn_lambda=False), tmp_path / "fixed", progress=False))
    assert abs(plain[0]["loss"] + plain[0]["log_p"]) < 1e-4
    assert all(line["lambda"] == 12.0 for line in fixed)
    assert plain[-1]["lambda"] != 12.0


def test_no_augmentation_collapses_to_a_positional_code(tmp_path):
    """Attempt 0 of the writeup (no augmentation, no PixelCenter): log_p goes to 0 and
    shuffled pairs score the same: the features encode pixel position, not content.
    (Batch 8 and 10 steps showed it for seeds 0-3; with batch 4 the shuffled score of
    some seeds was still noisy after 12 steps.)"""
    lines = metrics(train(tiny(batch=8, steps=10, aug="none", center=False, save_every=100), tmp_path / "run",
                          progress=False))
    assert lines[0]["log_p_shuffled"] < lines[0]["log_p"] - 3  # at the start, content still matters
    last = lines[-4:]
    assert sum(line["log_p"] for line in last) / 4 > -0.05, last
    assert sum(abs(line["log_p"] - line["log_p_shuffled"]) for line in last) / 4 < 0.2, last


# --------------------------------------------------------------------------- faults


def _nan_on_training_calls(monkeypatch, bad_calls: set[int]):
    """Make the training loss (log_p under grad) NaN on the given calls (1-based)."""
    original, calls = objective.log_p, {"n": 0}

    def log_p(*args, **kwargs):
        values = original(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] in bad_calls:
                return values * float("nan")
        return values

    monkeypatch.setattr(objective, "log_p", log_p)


def test_a_nan_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    _nan_on_training_calls(monkeypatch, {2})
    run = train(tiny(steps=3, save_every=100), tmp_path / "run", progress=False)
    lines = metrics(run)
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert lines[1]["event"] == "non_finite" and lines[1]["loss"] is None and lines[1]["bad_steps"] == 1
    assert lines[2]["bad_steps"] == 1 and lines[2]["bad_steps_in_row"] == 0 and lines[2]["loss"] > 0


def test_a_skipped_step_changes_no_weight(tmp_path, monkeypatch):
    _nan_on_training_calls(monkeypatch, {1})
    run = train(tiny(steps=1, save_every=100, optim="adam"), tmp_path / "run", progress=False)
    after = fmapicon.load(run).net.state_dict()
    torch.manual_seed(0)
    fresh = fmapicon.build_network(network_config(saved_config(run).to_dict()))
    # parameters untouched; buffers (BatchNorm statistics) may have moved in the forward pass
    assert all(torch.equal(p, after[name]) for name, p in fresh.named_parameters())


def test_bad_steps_in_a_row_stop_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    _nan_on_training_calls(monkeypatch, {3, 4, 5})
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row.*step 2"):
        train(tiny(steps=10, max_bad_steps=3), tmp_path / "run", progress=False)
    state = torch.load(tmp_path / "run" / "checkpoints" / "state.pt", weights_only=True)
    assert state["step"] == 2
    assert [line.get("event") for line in metrics(tmp_path / "run")] == [None, None, "non_finite",
                                                                         "non_finite", "non_finite"]
    fmapicon.load(tmp_path / "run")


def test_original_grad_accumulation_never_clears_gradients(tmp_path, monkeypatch):
    cleared = []
    for mode in ("off", "original"):
        processes, device = init_processes("cpu")
        trainer = Trainer(tiny(steps=2, grad_accumulation=mode), tmp_path, processes, device, progress=False)
        monkeypatch.setattr(trainer.optimizer, "zero_grad", lambda **kw: cleared.append(mode))
        a, b = next(iter(trainer.data))
        trainer.train_step(a, b)
        trainer.step = 1
        trainer.train_step(a, b)
    assert cleared == ["off", "off"]


def test_sigterm_saves_a_loadable_checkpoint(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "fmapicon", "train", "--out", str(run), "--size", "16", "--channels", "16",
               "--batch", "4", "--steps", "100000", "--log-every", "1", "--workers", "1", "--device", "cpu",
               "--no-progress"]
    process = subprocess.Popen(command, env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip()):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, err
    assert "SIGTERM received: saved a checkpoint" in err and "--resume" in err
    state = torch.load(run / "checkpoints" / "state.pt", weights_only=True)
    assert state["step"] >= 1 and metrics(run)[-1]["step"] == state["step"]
    loaded = fmapicon.load(run).net.state_dict()
    assert all(torch.equal(state["model"][name], loaded[name]) for name in loaded
               if name != "pixel_center.running_mean")  # calibrated in the weights file


def test_torchrun_two_processes_write_one_run_folder(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "fmapicon", "train", "--out", str(run), "--size", "16", "--channels", "16", "--batch", "4",
               "--steps", "3", "--log-every", "1", "--workers", "0", "--device", "cpu", "--no-progress"]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = metrics(run)
    assert [line["step"] for line in lines] == [1, 2, 3]  # rank 0 alone writes
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert all(line["pairs_per_s"] > 0 and line["loss"] > 0 for line in lines)
    fmapicon.load(run)


# --------------------------------------------------------------------------- evaluation


def test_evaluation_during_training_logs_jf_and_keeps_the_best(tmp_path, synth_root):
    run = train(tiny(steps=2, eval_every=1, davis=str(synth_root), save_every=100), tmp_path / "run",
                progress=False)
    lines = metrics(run)
    assert [line["step"] for line in lines] == [1, 2]
    scores = [line["jf_mean"] for line in lines]
    assert all(0 <= score <= 1 for score in scores)
    assert lines[-1]["best_jf_mean"] == max(scores)
    assert (run / "eval" / "step0000002" / "eval.json").is_file()
    assert not list((run / "eval" / "step0000002").glob("*/*.png"))  # predictions are not kept
    from safetensors import safe_open

    with safe_open(str(run / "checkpoints" / "best.safetensors"), framework="pt") as handle:
        saved = handle.metadata()
    assert float(saved["jf_mean"]) == max(scores) and int(saved["step"]) == scores.index(max(scores)) + 1
    assert fmapicon.load(run, which="best").channels == 16


def test_a_wrong_davis_root_fails_before_training(tmp_path):
    with pytest.raises(UserError, match="DAVIS root"):
        train(tiny(steps=2, eval_every=1, davis=str(tmp_path / "nowhere")), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- fine-tuning (--init)


def test_init_reference_starts_from_the_shipped_weights(tmp_path):
    """--init reference: the network is the shipped model's (preset and channels from it), its
    first step's objective equals the shipped network's on the same batch and draws, and the
    run folder records where it started."""
    from fmapicon.core.augment import four_draws, make_augmentation
    from fmapicon.core.checkpoint import feature_net
    from fmapicon.train.random_streams import AUGMENT_STREAM, stream_seed

    args = build_parser().parse_args(["train", "--init", "reference", "--data", "synth:scenes=2,frames=6,size=48",
                                      "--size", "32", "--batch", "2", "--steps", "1", "--workers", "0"])
    config, _, _ = config_from_args(args)
    shipped = fmapicon.load("reference")
    assert (config.net, config.channels) == ("resnet-s4", shipped.channels)
    processes, device = init_processes("cpu")
    trainer = Trainer(config, tmp_path / "run", processes, device, progress=False)
    reference = feature_net(shipped)
    for name, tensor in reference.state_dict().items():
        if name != "pixel_center.running_mean":  # trained at 128 pixels, here 32: not copied
            assert torch.equal(trainer.net.state_dict()[name], tensor.float()), name
    assert trainer.resolved["init_weights"]["not_copied"] == ["pixel_center.running_mean"]
    a, b = (torch.stack(items) for items in zip(*(trainer.dataset[i] for i in range(2))))
    _, loss = trainer._forward(a, b)
    net = reference.float().train()
    generator = torch.Generator().manual_seed(stream_seed(config.seed, AUGMENT_STREAM, 0, 1))
    maps = four_draws(net, a, b, make_augmentation(config.aug, stride=net.stride), generator=generator)
    expected = -objective.log_p(*maps, eps=config.log_eps).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), abs=1e-5)
    assert trainer.resolved["init_weights"]["spec"] == "reference"


def test_init_refuses_a_network_that_differs_from_its_weights(tmp_path):
    args = build_parser().parse_args(["train", "--init", "reference", "--net", "short"])
    with pytest.raises(UserError, match="--init reference holds a resnet-s4 network.*--net short"):
        config_from_args(args)
    with pytest.raises(UserError, match="--channels 8"):
        train(tiny(init="reference", net="resnet-s4", channels=8, steps=1), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_init_from_a_run_folder_continues_its_weights(tmp_path):
    """A run folder as --init: the new run's step-0 weights are the old run's last weights."""
    first = train(tiny(steps=2, save_every=100), tmp_path / "first", progress=False)
    second = train(tiny(steps=1, save_every=100, init=str(first)), tmp_path / "second", progress=False)
    saved = json.loads((second / "config.json").read_text())
    assert saved["init"] == str(first) and saved["init_weights"]["step"] == 2
    old = fmapicon.load(first).net.state_dict()
    processes, device = init_processes("cpu")
    fresh = Trainer(saved_config(second), tmp_path / "unused", processes, device, progress=False)
    assert all(torch.equal(fresh.net.state_dict()[name], tensor) for name, tensor in old.items())
