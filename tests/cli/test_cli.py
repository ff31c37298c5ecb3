"""The command line's shared option validators and how bad options fail (before anything runs)."""

import argparse

import pytest
import torch

from fmapicon.cli import _types, main


@pytest.mark.parametrize("check, good, value", [
    (_types.positive_int, "3", 3),
    (_types.non_negative_int, "0", 0),
    (_types.positive_float, "0.5", 0.5),
    (_types.non_negative_float, "0", 0.0),
    (_types.at_least(16), "16", 16),
    (_types.int_list(), "64, 120", [64, 120]),
    (_types.int_list(8), "8", [8]),
    (_types.device_name, "cuda:1", "cuda:1"),
    (_types.training_source, "synth:scenes=2", "synth:scenes=2"),
])
def test_validators_accept_good_values(check, good, value):
    assert check(good) == value


@pytest.mark.parametrize("check, bad", [
    (_types.positive_int, "0"), (_types.positive_int, "2.5"), (_types.positive_int, "x"),
    (_types.non_negative_int, "-1"),
    (_types.positive_float, "0"), (_types.positive_float, "nan"), (_types.positive_float, "inf"),
    (_types.positive_float, "-1"),
    (_types.non_negative_float, "-0.1"), (_types.non_negative_float, "nan"),
    (_types.at_least(16), "15"),
    (_types.int_list(), ""), (_types.int_list(), "4,x"), (_types.int_list(8), "64,4"),
    (_types.device_name, "gpu"), (_types.device_name, "cuda:"),
    (_types.existing_folder, "/no/such/folder"),
    (_types.training_source, "/no/such/video.mp4"),
])
def test_validators_refuse_bad_values_with_a_message(check, bad):
    with pytest.raises(argparse.ArgumentTypeError, match="expected|not a folder|does not exist"):
        check(bad)


@pytest.mark.parametrize("argv", [
    ["demo", "--minutes", "0"],
    ["ablate", "--steps", "-3"],
    ["match", "a.png", "b.png", "--stride", "0"],
    ["eval", "--davis", "x", "--model", "pixels", "--topk", "zero"],
    ["bench", "loss", "--n", "1024,0"],
    ["bench", "train", "--sizes", "4"],
    ["bench", "data", "--workers", "-1"],
    ["synth", "out", "--size", "8", "8"],
    ["demo", "--no-such-option"],
])
def test_bad_options_stop_at_parsing(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert "error: " in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing was written


def test_mistyped_option_suggests_the_closest(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--stesp", "3"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --stesp 3" in err and "did you mean --steps?" in err
    assert "fmapicon train: error" in err


def test_train_help_shows_true_defaults_and_no_rst(capsys):
    from fmapicon.train import config_fields

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "``" not in text
    fields = config_fields()
    for name in ("crop_max", "seed"):
        default = fields[name]["default"]
        assert not isinstance(default, bool)
        assert f"(default: {default}" in text, name


def test_warnings_print_one_clean_line(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from fmapicon.data.davis import write_indexed_png

    root = tmp_path / "davis"
    for name, frames in (("long", 4), ("short", 1)):
        for t in range(frames):
            (root / "JPEGImages" / "480p" / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 6)).save(root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg")
            write_indexed_png(root / "Annotations" / "480p" / name / f"{t:05d}.png", np.ones((6, 8), np.uint8))
            write_indexed_png(tmp_path / "pred" / name / f"{t:05d}.png", np.ones((6, 8), np.uint8))
    (root / "ImageSets").mkdir()
    (root / "ImageSets" / "val.txt").write_text("long\nshort\n")
    assert main(["score", "--davis", str(root), "--results", str(tmp_path / "pred")]) == 0
    captured = capsys.readouterr()
    lines = [line.split("\r")[-1] for line in captured.err.splitlines() if "warning" in line]
    assert lines == ["fmapicon: warning: sequence 'short' skipped: nothing to score (fewer than 3 annotated "
                     "frame(s): the first and the last are not scored)"]
    assert "1 sequence(s) skipped with nothing to score: short" in captured.out
    assert "score:" in captured.err                                 # the progress bar ...
    assert main(["score", "--davis", str(root), "--results", str(tmp_path / "pred"), "--no-progress"]) == 0
    assert "score:" not in capsys.readouterr().err                  # ... and without it


def test_skipped_file_message_is_one_line(tmp_path):
    from fmapicon.data.sources import ScanReport, SkippedFileWarning

    with pytest.warns(SkippedFileWarning) as caught:
        ScanReport().skip(tmp_path / "a.mp4", "not_a_video", "Invalid data\nfound when processing input")
    assert str(caught[0].message) == f"skipping {tmp_path / 'a.mp4'}: not a video (Invalid data found when processing input)"


def test_match_names_the_flag_of_a_library_parameter_error():
    """The library says ``radius must be ...``; ``fmapicon match`` says ``--radius must be ...``."""
    from fmapicon.cli.match import _flags_named
    from fmapicon.errors import UserError

    with pytest.raises(UserError, match="^--radius must be >= 0"), _flags_named():
        raise ValueError("radius must be >= 0 feature cells, got -1")
    with pytest.raises(ValueError, match="^another problem") as info, _flags_named():
        raise ValueError("another problem")
    assert not isinstance(info.value, UserError)  # anything else is a bug to show, not a user error


def test_a_closed_stdout_ends_quietly(tmp_path):
    import subprocess
    import sys

    root = _small_root(tmp_path / "davis")
    argv = ["eval", "--davis", str(root), "--model", "copy", "--out", str(tmp_path / "ev"), "--no-progress"]
    code = f"import sys; from fmapicon.cli import main; sys.exit(main({argv!r}))"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # as `fmapicon eval ... | head -0` does
    err = process.stderr.read().decode()
    assert process.wait() == 141 and err == ""
    assert (tmp_path / "ev" / "eval.json").is_file()  # the work was done and published


def _small_root(root, frames=5):
    import numpy as np
    from PIL import Image

    from fmapicon.data.davis import write_indexed_png

    mask = np.zeros((12, 16), np.uint8)
    mask[3:8, 4:10] = 1
    for name in ("seqa", "seqb"):
        for t in range(frames):
            (root / "JPEGImages" / "480p" / name).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 12), (t * 20, 0, 0)).save(root / "JPEGImages" / "480p" / name / f"{t:05d}.jpg")
            write_indexed_png(root / "Annotations" / "480p" / name / f"{t:05d}.png", mask)
    (root / "ImageSets").mkdir()
    (root / "ImageSets" / "val.txt").write_text("seqa\nseqb\n")
    return root


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_refused_eval_rerun_leaves_the_earlier_evaluation_byte_for_byte(tmp_path, capsys):
    root = _small_root(tmp_path / "davis")
    out = tmp_path / "ev"
    assert main(["eval", "--davis", str(root), "--model", "copy", "--out", str(out), "--no-progress"]) == 0
    before = _tree(out)
    assert "eval.json" in before and "seqb/00004.png" in before
    (root / "JPEGImages" / "480p" / "seqb" / "00003.jpg").write_bytes(b"<html>503</html>")  # a broken download
    capsys.readouterr()
    assert main(["eval", "--davis", str(root), "--model", "copy", "--out", str(out), "--force",
                 "--no-progress"]) == 2
    assert "00003.jpg" in capsys.readouterr().err
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["davis", "ev"]


def test_annotations_without_frames_are_named_plainly(tmp_path, capsys):
    root = _small_root(tmp_path / "davis")
    (root / "JPEGImages" / "480p" / "seqb" / "00004.jpg").unlink()  # the frames stop before the annotations
    assert main(["eval", "--davis", str(root), "--model", "copy", "--out", str(tmp_path / "ev"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "partial" not in err
    assert "1 of 5 annotation(s) in" in err and "Annotations/480p/seqb have no frame" in err and "00004.png" in err


# --------------------------------------------------------------------------- fmapicon track


def _track_inputs(synth_root):
    name = sorted(p.name for p in (synth_root / "JPEGImages" / "480p").iterdir())[0]
    return synth_root / "Videos" / f"{name}.mp4", synth_root / "Annotations" / "480p" / name / "00000.png"


def test_track_writes_masks_points_a_playable_overlay_and_its_record(synth_root, tmp_path, capsys):
    import json

    import av

    video, mask = _track_inputs(synth_root)
    points = tmp_path / "points.csv"
    points.write_text("frame,x,y,id\n0,40,50,nose\n2,20.5,60,tail\n")
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:
        assert main(["track", str(video), "--mask", str(mask), "--points", str(points), "--out", str(out),
                     "--model", "pixels", "--stride", "4", "--no-progress", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    record = json.loads((out / "track.json").read_text())
    assert record["frames"] == 12 and record["protocol"]["stride"] == 4 and record["points"] == 2
    assert record["threads"] == 1 and record["protocol"]["input_scale"] == record["input_scale"] == 1.0
    assert len(list((out / "masks").glob("*.png"))) == 12
    rows = (out / "points.csv").read_text().splitlines()
    assert rows[0] == "id,frame,x,y,score" and len(rows) == 1 + 12 + 10
    with av.open(str(out / "overlay.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name in ("h264", "mpeg4")
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    assert len(decoded) == 12 and decoded[0].shape == (96, 96, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "points.csv"]      # no staging left
    from fmapicon.data.sources import stated_frames, video_rate

    assert stated_frames(video) == 12 and video_rate(video) == 24.0


def test_track_of_a_frame_folder_names_the_masks_after_the_frame_files(synth_root, tmp_path):
    import shutil

    video, mask = _track_inputs(synth_root)
    frames = sorted((synth_root / "JPEGImages" / "480p" / video.stem).glob("*.jpg"))[:4]
    folder = tmp_path / "frames"
    folder.mkdir()
    for n, path in enumerate(frames):                     # natural order: shot2 before shot10
        shutil.copy(path, folder / f"shot{2 + 8 * n}.jpg")
    out = tmp_path / "out"
    assert main(["track", str(folder), "--mask", str(mask), "--out", str(out), "--model", "pixels",
                 "--stride", "4", "--no-overlay", "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["shot10.png", "shot18.png", "shot2.png", "shot26.png"]


@pytest.mark.parametrize("case, message", [
    ("mask_size", "pixels but the frames are 96 x 96"),
    ("mask_late", "is for frame 40 but the video has 12 frames"),
    ("no_column", "has no column y"),
    ("outside", "outside the 96 x 96 frames"),
    ("not_number", "must be numbers"),
    ("empty_video", "is empty"),
    ("not_empty", "already holds"),
    ("frame_word", "a whole number"),
])
def test_track_bad_input_is_one_line_exit_2_and_nothing_written(case, message, synth_root, tmp_path, capsys):
    import numpy as np

    from fmapicon.data.davis import write_indexed_png

    video, mask = _track_inputs(synth_root)
    out, points = tmp_path / "out", tmp_path / "points.csv"
    argv = ["track", str(video), "--out", str(out), "--model", "pixels", "--no-progress", "--mask", str(mask)]
    if case == "mask_size":
        write_indexed_png(tmp_path / "small.png", np.ones((20, 30), np.uint8))
        argv[-1] = str(tmp_path / "small.png")
    elif case == "mask_late":
        argv[-1] = f"{mask}@40"
    elif case in ("no_column", "outside", "not_number"):
        points.write_text({"no_column": "frame,x\n0,3\n", "outside": "frame,x,y\n0,3,200\n",
                           "not_number": "frame,x,y\nfirst,3,4\n"}[case])
        argv += ["--points", str(points)]
    elif case == "empty_video":
        (tmp_path / "empty.mp4").write_bytes(b"")
        argv[1] = str(tmp_path / "empty.mp4")
    elif case == "not_empty":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
    elif case == "frame_word":
        argv[-1] = f"{mask}@first"
    with pytest.raises(SystemExit) if case == "frame_word" else _no_exit() as stopped:
        code = main(argv)
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()[-1:] if case == "frame_word" else err.splitlines()   # argparse: usage, then error
    assert message in err and len(lines) == 1, err
    assert (stopped.value.code if case == "frame_word" else code) == 2
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left == (["mine.txt"] if case == "not_empty" else [])
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


class _no_exit:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
