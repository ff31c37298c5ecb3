"""The command line's shared option validators and how bad options fail (before anything runs)."""

import argparse

import pytest

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
