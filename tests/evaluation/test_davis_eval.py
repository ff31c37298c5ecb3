"""The DAVIS harness: predictions, scores and the protocol written, strict eval.json, the
first annotated frame, temporal order, an untouched out folder on failure, ``fmapicon eval``."""


from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fmapicon.data.davis import annotation_paths, frame_paths, layout, read_annotation, write_indexed_png
from fmapicon.errors import UserError
from fmapicon.evaluation.metrics import score_davis
from fmapicon.evaluation.davis_eval import evaluate_davis
from fmapicon.evaluation.propagate import PropagationParams


def test_evaluate_writes_predictions_scores_and_the_protocol(synth_root, tmp_path):
    params = PropagationParams(stride=8, context=5, radius=6)
    result = evaluate_davis("pixels", synth_root, tmp_path, params=params, progress=False)
    images, annotations = layout(synth_root)
    for name in result["sequences"]:
        written = sorted(p.name for p in (tmp_path / name).glob("*.png"))
        assert written == [p.stem + ".png" for p in frame_paths(images, name)]
        first = read_annotation(annotation_paths(annotations, name)[0])
        assert np.array_equal(read_annotation(tmp_path / name / "00000.png"), first)
    record = json.loads((tmp_path / "eval.json").read_text())
    assert record["protocol"] == "crw" and record["params"]["radius"] == 6 and record["params"]["topk"] == 10
    assert record["input_scale"] == 1.0 and record["model"].startswith("pixels")
    assert set(record["timings"][result["sequences"][0]]) >= {"frames", "features_s", "propagation_s"}
    assert (tmp_path / "global_results-val.csv").is_file() and (tmp_path / "per-sequence_results-val.csv").is_file()
    assert 0 < record["jf_mean"] <= 1 and record["jf_mean"] == result["jf_mean"]


def test_cli_eval_copy(synth_root, tmp_path, capsys):
    from fmapicon.cli import main

    assert main(["eval", "--davis", str(synth_root), "--model", "copy", "--out", str(tmp_path / "e"),
                 "--device", "cpu"]) == 0
    assert "Global results for val" in capsys.readouterr().out
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["protocol"] == "copy"
    assert main(["eval", "--davis", str(tmp_path / "e"), "--model", "copy", "--out", str(tmp_path / "f")]) == 2


def test_bench_propagate_repeat_alternates_and_reports_each_sequences_fastest_run(synth_root, tmp_path, capsys,
                                                                                    monkeypatch):
    import fmapicon.bench.propagate as bench
    from fmapicon.cli import main

    runs = []
    time_sequence = bench._time_sequence

    def recorded(model, *args):
        row = time_sequence(model, *args)
        runs.append((model.name, row))
        return row

    monkeypatch.setattr(bench, "_time_sequence", recorded)
    out = tmp_path / "bench.json"
    assert main(["bench", "propagate", "--davis", str(synth_root), "--model", "random", "--count", "2",
                 "--frames", "4", "--repeat", "3", "--threads", "1", "--json", str(out)]) == 0
    # 3 rounds, each sequence by the model then by the baseline
    names = [name for name, _ in runs]
    assert len(runs) == 12 and names[0::2] == [names[0]] * 6 and names[1::2] == [names[1]] * 6
    assert names[0].startswith("random") and names[1].startswith("pixels")
    record = json.loads(out.read_text())
    assert record["repeat"] == 3
    rows = {row["sequence"]: row for row in record["rows"]}
    for sequence in {row["sequence"] for _, row in runs}:
        for model, label in ((names[0], sequence), (names[1], f"pixels: {sequence}")):
            times = [row["total_s"] for name, row in runs if name == model and row["sequence"] == sequence]
            assert len(times) == 3 and rows[label]["total_s"] == min(times)
    assert rows["measured"]["frames"] == 8
    printed = capsys.readouterr().out
    assert "fastest of 3 runs" in printed and f"propagation, {names[0]} / pixels: " in printed


def test_cli_eval_pixels_weight_is_applied_and_recorded(synth_root, tmp_path, capsys):
    from fmapicon.cli import main

    common = ["eval", "--davis", str(synth_root), "--model", "random", "--device", "cpu", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "alone")]) == 0
    assert main([*common, "--pixels-weight", "0.4", "--out", str(tmp_path / "fused")]) == 0
    alone, fused = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("alone", "fused"))
    assert alone["params"]["pixels_weight"] == 0 and fused["params"]["pixels_weight"] == 0.4
    assert fused["jf_mean"] != alone["jf_mean"]
    capsys.readouterr()
    assert main([*common, "--pixels-weight", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "use --model pixels" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_pixels_beat_copy_on_a_real_sequence(davis2016_root, tmp_path):
    """Real DAVIS frames (dog-agility, 25 frames 854 x 480): Lab patches propagated with the
    CRW protocol follow the dog; copying the first mask does not (measured 0.50 vs 0.13)."""
    copy = evaluate_davis("copy", davis2016_root, tmp_path / "copy", "dev", ["dog-agility"], progress=False)
    pixels = evaluate_davis("pixels", davis2016_root, tmp_path / "pixels", "dev", ["dog-agility"], progress=False)
    assert pixels["jf_mean"] > copy["jf_mean"] + 0.2



def _moving_root(root, frames=8, first=0, names=None, set_name="val"):
    """A bright 6 x 6 square moving 2 px/frame right over black, 32 x 48; annotated from ``first``."""
    names = names or [f"{t:05d}" for t in range(frames)]
    ids = np.zeros((frames, 32, 48), np.uint8)
    for t in range(frames):
        ids[t, 10:16, 4 + 2 * t:10 + 2 * t] = 1
    from PIL import Image

    for t in range(frames):
        (root / "JPEGImages" / "480p" / "seq").mkdir(parents=True, exist_ok=True)
        Image.fromarray((ids[t] * 250).astype(np.uint8)).convert("RGB").save(
            root / "JPEGImages" / "480p" / "seq" / f"{names[t]}.png")
        if t >= first:
            write_indexed_png(root / "Annotations" / "480p" / "seq" / f"{names[t]}.png", ids[t])
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / f"{set_name}.txt").write_text("seq\n")
    return ids


def test_propagation_starts_at_the_first_annotated_frame(tmp_path):
    ids = _moving_root(tmp_path / "davis", first=3)
    evaluate_davis("pixels", tmp_path / "davis", tmp_path / "out", params=PropagationParams(stride=2),
                   progress=False, device="cpu")
    for t in range(3):  # nothing is known before the first annotation: background
        assert not read_annotation(tmp_path / "out" / "seq" / f"{t:05d}.png").any()
    assert np.array_equal(read_annotation(tmp_path / "out" / "seq" / "00003.png"), ids[3])
    record = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert record["timings"]["seq"]["first_annotated"] == 3 and record["timings"]["seq"]["frames"] == 5


def test_unpadded_names_propagate_in_temporal_order(tmp_path):
    names = [str(t + 1) for t in range(12)]
    ids = _moving_root(tmp_path / "davis", frames=12, names=names)
    evaluate_davis("copy", tmp_path / "davis", tmp_path / "copy", progress=False)
    result = evaluate_davis("pixels", tmp_path / "davis", tmp_path / "out", params=PropagationParams(stride=2),
                            progress=False, device="cpu")
    assert result["per_frame"]["seq_1"]["frames"] == names[1:-1]  # scored in temporal order
    # the square moves right: the propagated masks follow it frame after frame, in 1, 2, ..., 12 order
    centres = [np.argwhere(read_annotation(tmp_path / "out" / "seq" / f"{n}.png") == 1)[:, 1].mean() for n in names]
    assert all(b > a for a, b in zip(centres, centres[1:]))
    assert ids.shape[0] == 12


def test_sequences_with_nothing_to_score_are_skipped_and_json_is_strict(tmp_path):
    from fmapicon.evaluation.metrics import SkippedSequenceWarning

    root = tmp_path / "davis"
    for name, frames in (("one", 1), ("two", 2)):
        _moving_root(root, frames=frames)
        (root / "JPEGImages" / "480p" / "seq").rename(root / "JPEGImages" / "480p" / name)
        (root / "Annotations" / "480p" / "seq").rename(root / "Annotations" / "480p" / name)
    _moving_root(root, frames=6)
    (root / "ImageSets" / "2017" / "val.txt").write_text("seq\none\ntwo\n")
    with pytest.warns(SkippedSequenceWarning) as caught:
        result = evaluate_davis("copy", root, tmp_path / "out", progress=False)
    assert sorted(str(w.message).split("'")[1] for w in caught) == ["one", "two"]
    assert result["skipped"] == ["one", "two"] and result["sequences"] == ["seq"]
    text = (tmp_path / "out" / "eval.json").read_text()
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in eval.json"))
    assert record["skipped"] == ["one", "two"] and math.isfinite(record["jf_mean"])
    (root / "ImageSets" / "2017" / "val.txt").write_text("one\ntwo\n")
    with pytest.warns(SkippedSequenceWarning), pytest.raises(UserError, match="nothing to score"):
        score_davis(root, tmp_path / "out", progress=False)


def test_failed_evaluation_leaves_the_out_folder_untouched(tmp_path, monkeypatch):
    import fmapicon.evaluation.davis_eval as davis_eval

    _moving_root(tmp_path / "davis")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(davis_eval, "_write_record", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        evaluate_davis("copy", tmp_path / "davis", out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_cli_eval_refuses_an_existing_out_unless_force(tmp_path, capsys):
    from fmapicon.cli import main

    _moving_root(tmp_path / "davis")
    out = tmp_path / "out"
    argv = ["eval", "--davis", str(tmp_path / "davis"), "--model", "copy", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    assert main(argv) == 2
    assert "pass --force" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    assert main(argv + ["--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "global_results-val.csv", "notes.txt",
                                                     "per-sequence_results-val.csv", "seq"]
