"""J&F as the official davis2017-evaluation toolkit: known answers worked out by hand."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from fmapicon.evaluation import metrics
from fmapicon.data.davis import annotation_paths, layout, read_annotation, write_indexed_png
from fmapicon.errors import UserError
from fmapicon.evaluation.metrics import (boundary_map, boundary_tolerance, decay_bins, dilate, disk, f_measure, jaccard,
                              score_davis, score_frame, statistics, write_results)

# skimage.morphology.disk(r) for r = 1, 2, 3, written out (the toolkit's footprint)
SKIMAGE_DISKS = {
    1: ["010",
        "111",
        "010"],
    2: ["00100",
        "01110",
        "11111",
        "01110",
        "00100"],
    3: ["0001000",
        "0111110",
        "0111110",
        "1111111",
        "0111110",
        "0111110",
        "0001000"],
}


def _rows(array):
    return ["".join(str(int(v)) for v in row) for row in array]


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_disk_is_skimage_disk(radius):
    assert _rows(disk(radius)) == SKIMAGE_DISKS[radius]
    assert _rows(disk(float(radius))) == SKIMAGE_DISKS[radius]  # the toolkit passes a float


@pytest.mark.parametrize("radius", [1, 2, 3, 5, 8, 10])
def test_dilate_is_binary_dilation_with_the_disk(radius):
    from scipy.ndimage import binary_dilation

    rng = np.random.default_rng(radius)
    mask = rng.random((37, 53)) > 0.97
    mask[0, 0] = mask[-1, -1] = mask[0, -1] = True  # corners: the border is zero outside
    assert np.array_equal(dilate(mask, disk(radius)), binary_dilation(mask, structure=disk(radius)))


def test_boundary_map_of_a_pixel_and_of_a_full_mask():
    mask = np.zeros((5, 5), bool)
    mask[2, 2] = True
    # the boundary sits half a pixel towards the origin: the pixel and its up/left neighbours
    assert np.argwhere(boundary_map(mask)).tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]
    assert not boundary_map(np.ones((4, 6), bool)).any()  # the image border is no boundary


def _half_plane(columns, size=100):
    mask = np.zeros((size, size), bool)
    mask[:, :columns] = True
    return mask


def test_jaccard_known_answers():
    truth = _half_plane(50)
    assert jaccard(np.zeros_like(truth), truth) == 0.0
    assert jaccard(np.zeros_like(truth), np.zeros_like(truth)) == 1.0  # empty union counts 1
    assert jaccard(_half_plane(53), truth) == pytest.approx(50 / 53)
    void = np.zeros_like(truth)
    void[:, 50:53] = True
    assert jaccard(_half_plane(53), truth, void) == 1.0


def test_tolerance_is_ceil_of_0008_diagonal():
    assert boundary_tolerance((100, 100)) == 2      # 1.13 -> 2
    assert boundary_tolerance((480, 854)) == 8      # 7.84 -> 8
    assert boundary_tolerance((480, 1152)) == 10    # 9.98 -> 10
    assert boundary_tolerance((10, 10), 3) == 3     # >= 1 means pixels


def test_f_one_pixel_past_the_tolerance_edge():
    # truth: columns < 50, its boundary is column 49; the tolerance on 100 x 100 is 2 pixels
    truth = _half_plane(50)
    assert f_measure(_half_plane(52), truth) == 1.0  # boundary 2 pixels away: matched
    assert f_measure(_half_plane(53), truth) == 0.0  # 3 pixels away: nothing matched


def test_f_partial_match_by_hand():
    truth = _half_plane(50)  # boundary: column 49, 100 pixels
    prediction = _half_plane(52)
    prediction[50:, 52] = True  # the lower half reaches one column further
    # prediction boundary: rows 0-49 at column 51 (50 px, 2 away: matched), row 49 also at
    # column 52, rows 50-99 at column 52 (51 px, 3 away: not matched) -> precision 50/101;
    # truth rows 0-49 have a predicted pixel 2 away, rows 50-99 none within 2 -> recall 1/2
    precision, recall = 50 / 101, 50 / 100
    assert f_measure(prediction, truth) == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-15)


def test_f_empty_mask_conventions():
    truth, empty = _half_plane(50), np.zeros((100, 100), bool)
    assert f_measure(empty, truth) == 0.0   # precision 1, recall 0
    assert f_measure(truth, empty) == 0.0   # precision 0, recall 1
    assert f_measure(empty, empty) == 1.0


def test_void_counts_as_background_unless_excluded():
    truth = np.zeros((20, 30), np.uint8)
    truth[5:15, 5:15] = 1
    truth[5:15, 15:18] = 255  # void beside the object
    prediction = np.where(truth == 255, 1, truth)  # the prediction covers the void too
    j_toolkit, _ = score_frame(truth, prediction, 1)
    j_excluded, f_excluded = score_frame(truth, prediction, 1, exclude_void=True)
    assert j_toolkit[0] == pytest.approx(100 / 130)
    assert j_excluded[0] == 1.0 and f_excluded[0] == 1.0


def test_decay_bins_by_hand():
    # linspace(1, 7, 5) = 1, 2.5, 4, 5.5, 7: the 1e-10 rounds the halves up (3 and 6)
    assert decay_bins(7).tolist() == [0, 2, 3, 5, 6]
    assert decay_bins(10).tolist() == [0, 2, 5, 7, 9]
    assert decay_bins(1).tolist() == [0, 0, 0, 0, 0]


def test_statistics_by_hand():
    mean, recall, decay = statistics([1, 1, 0, 0, 0, 0, 0])
    assert (mean, recall) == (pytest.approx(2 / 7), pytest.approx(2 / 7))
    assert decay == pytest.approx(2 / 3)  # first bin v[0:3] = 1, 1, 0; last bin v[5:7] = 0, 0
    mean, recall, decay = statistics([np.nan, 1, 1, 0, 0, 0, 0])
    assert mean == pytest.approx(2 / 6) and recall == pytest.approx(2 / 7) and decay == pytest.approx(1.0)
    assert all(np.isnan(statistics([])))


# --------------------------------------------------------------------------- whole sets


def _write_root(root, sequences: dict, set_name="val"):
    """A DAVIS-2017 layout: ``sequences`` maps names to uint8 ``T x H x W`` ground-truth ids."""
    for name, masks in sequences.items():
        for t, mask in enumerate(masks):
            frames = root / "JPEGImages" / "480p" / name
            frames.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", mask.shape[::-1]).save(frames / f"{t:05d}.jpg")
            write_indexed_png(root / "Annotations" / "480p" / name / f"{t:05d}.png", mask)
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    names = b"".join(os.fsencode(n) + b"\n" for n in sequences)  # names in bytes, as a file system holds them
    (root / "ImageSets" / "2017" / f"{set_name}.txt").write_bytes(names)
    return root


def _write_predictions(out, name, masks):
    for t, mask in enumerate(masks):
        write_indexed_png(out / name / f"{t:05d}.png", mask)


def _two_objects(frames=5):
    mask = np.zeros((40, 60), np.uint8)
    mask[5:30, 5:20] = 1
    mask[10:35, 35:55] = 2
    return np.repeat(mask[None], frames, axis=0)


def test_two_objects_right_and_swapped(tmp_path):
    truth = _two_objects()
    root = _write_root(tmp_path / "davis", {"seq": truth})
    _write_predictions(tmp_path / "right", "seq", truth)
    swapped = np.choose(truth, [0, 2, 1]).astype(np.uint8)
    _write_predictions(tmp_path / "swapped", "seq", swapped)

    right = score_davis(root, tmp_path / "right", progress=False)
    assert right["global"] == {"J&F-Mean": 1.0, "J-Mean": 1.0, "J-Recall": 1.0, "J-Decay": 0.0,
                               "F-Mean": 1.0, "F-Recall": 1.0, "F-Decay": 0.0}
    wrong = score_davis(root, tmp_path / "swapped", progress=False)
    assert [o["Sequence"] for o in wrong["objects"]] == ["seq_1", "seq_2"]
    assert all(value == 0.0 for value in wrong["global"].values())
    assert wrong["per_frame"]["seq_1"]["frames"] == ["00001", "00002", "00003"]  # first and last dropped

    global_csv, sequence_csv = write_results(wrong, tmp_path / "swapped")
    assert global_csv.name == "global_results-val.csv"
    assert global_csv.read_text() == ("J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay\n"
                                      "0.000,0.000,0.000,0.000,0.000,0.000,0.000\n")
    assert sequence_csv.name == "per-sequence_results-val.csv"
    assert sequence_csv.read_text() == "Sequence,J-Mean,F-Mean\nseq_1,0.000,0.000\nseq_2,0.000,0.000\n"


def test_csv_has_three_decimals_and_empty_nan(tmp_path):
    values = [0.12345, 0.5, 1, -0.0004, 0.9996, 0, np.nan]
    results = {"set": "val", "global": dict(zip(metrics.GLOBAL_COLUMNS, values)),
               "objects": [{"Sequence": "a_1", "J-Mean": 0.6666, "F-Mean": 0.0005}]}
    global_csv, sequence_csv = write_results(results, tmp_path)
    assert global_csv.read_text().splitlines()[1] == "0.123,0.500,1.000,-0.000,1.000,0.000,"
    assert sequence_csv.read_text().splitlines()[1] == "a_1,0.667,0.001"


def test_objects_are_ids_up_to_the_first_frames_largest(tmp_path):
    truth = _two_objects()
    truth[0][truth[0] == 1] = 0  # object 1 absent from frame 0: ids 1..2 are still scored
    truth[0, 0, 0] = 255         # void does not count as an object id
    root = _write_root(tmp_path / "davis", {"seq": truth})
    _write_predictions(tmp_path / "pred", "seq", truth)
    assert [o["Sequence"] for o in score_davis(root, tmp_path / "pred", progress=False)["objects"]] == ["seq_1", "seq_2"]


def test_bad_predictions_are_named(tmp_path):
    truth = _two_objects()
    root = _write_root(tmp_path / "davis", {"seq": truth})
    with pytest.raises(UserError, match="results folder"):
        score_davis(root, tmp_path / "nowhere", progress=False)
    _write_predictions(tmp_path / "pred", "seq", truth)
    (tmp_path / "pred" / "seq" / "00002.png").unlink()
    with pytest.raises(UserError, match="missing prediction .*seq/00002.png"):
        score_davis(root, tmp_path / "pred", progress=False)
    write_indexed_png(tmp_path / "pred" / "seq" / "00002.png", truth[2][:-1])
    with pytest.raises(UserError, match="00002.png is 60 x 39"):
        score_davis(root, tmp_path / "pred", progress=False)
    write_indexed_png(tmp_path / "pred" / "seq" / "00002.png", np.full_like(truth[2], 3))
    with pytest.raises(UserError, match="00002.png holds object id 3"):
        score_davis(root, tmp_path / "pred", progress=False)


def test_cli_score_writes_the_csvs(tmp_path, capsys):
    from fmapicon.cli import main

    truth = _two_objects()
    root = _write_root(tmp_path / "davis", {"seq": truth}, set_name="dev")
    _write_predictions(tmp_path / "pred", "seq", truth)
    assert main(["score", "--davis", str(root), "--set", "dev", "--results", str(tmp_path / "pred")]) == 0
    printed = capsys.readouterr().out
    assert "Global results for dev" in printed and "seq_2" in printed
    assert (tmp_path / "pred" / "global_results-dev.csv").is_file()
    assert main(["score", "--davis", str(tmp_path), "--results", str(tmp_path / "pred")]) == 2


def test_copy_scores_the_mean_of_first_frame_copies(synth_root, tmp_path):
    from fmapicon.evaluation.davis_eval import evaluate_davis

    result = evaluate_davis("copy", synth_root, tmp_path / "copy", progress=False)
    rescored = score_davis(synth_root, tmp_path / "copy", progress=False)
    assert rescored["global"] == result["global"]
    _, annotations = layout(synth_root)
    j_means, f_means = [], []
    for name in result["sequences"]:
        truth = [read_annotation(p) for p in annotation_paths(annotations, name)]
        for k in range(1, int(truth[0].max()) + 1):
            j_means.append(np.mean([jaccard(truth[0] == k, t == k) for t in truth[1:-1]]))
            f_means.append(np.mean([f_measure(truth[0] == k, t == k) for t in truth[1:-1]]))
    assert result["global"]["J-Mean"] == pytest.approx(np.mean(j_means), abs=1e-12)
    assert result["global"]["F-Mean"] == pytest.approx(np.mean(f_means), abs=1e-12)
    assert result["jf_mean"] == pytest.approx((np.mean(j_means) + np.mean(f_means)) / 2, abs=1e-12)
    assert 0 < result["jf_mean"] < 1  # the objects move: copying is not perfect


def test_davis2016_grayscale_scores_as_its_palette_conversion(davis2016_root, tmp_path):
    name = "dog-agility"
    images, annotations = layout(davis2016_root)
    truth = np.stack([read_annotation(p) for p in annotation_paths(annotations, name)])
    converted = tmp_path / "palette"
    for t, mask in enumerate(truth):
        write_indexed_png(converted / "Annotations" / "480p" / name / f"{t:05d}.png", mask)
    (converted / "JPEGImages" / "480p").mkdir(parents=True)
    (converted / "JPEGImages" / "480p" / name).symlink_to(images / name)
    prediction = np.roll(truth, (6, -9), axis=(1, 2))  # a shifted truth: J and F well inside (0, 1)
    _write_predictions(tmp_path / "indexed", name, prediction)
    for t, mask in enumerate(prediction):  # the same prediction as DAVIS-2016 style 0/255 grayscale
        (tmp_path / "grey" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask * 255).save(tmp_path / "grey" / name / f"{t:05d}.png")

    reference = score_davis(davis2016_root, tmp_path / "indexed", sequences=[name], progress=False)
    assert 0.3 < reference["global"]["J-Mean"] < 0.95
    for root, results in ((converted, tmp_path / "indexed"), (davis2016_root, tmp_path / "grey")):
        assert score_davis(root, results, sequences=[name], progress=False)["global"] == reference["global"]


# --------------------------------------------------------------------------- any geometry


def _plain_f(prediction, truth, radius):
    """F by the plain definition: dilate the WHOLE frame with scipy, no bounding boxes."""
    from scipy.ndimage import binary_dilation

    bp, bg = boundary_map(prediction), boundary_map(truth)
    n_p, n_g = bp.sum(), bg.sum()
    if n_p == 0 or n_g == 0:
        p, r = (1.0 if n_p == 0 else 0.0), (1.0 if n_g == 0 else 0.0)
    else:
        p = (bp & binary_dilation(bg, structure=disk(radius))).sum() / n_p
        r = (bg & binary_dilation(bp, structure=disk(radius))).sum() / n_g
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def _random_shape(rng, shape):
    """A small random object: a pixel, a thin line, a box, or scattered pixels, anywhere
    (also touching the borders), or nothing."""
    mask = np.zeros(shape, bool)
    kind = rng.integers(5)
    h, w = shape
    if kind == 0:
        mask[rng.integers(h), rng.integers(w)] = True
    elif kind == 1:
        y, x = rng.integers(h), rng.integers(w)
        mask[y:y + rng.integers(1, 4), x:x + rng.integers(1, w + 1)] = True
    elif kind == 2:
        y, x = rng.integers(h), rng.integers(w)
        mask[y:y + rng.integers(1, h + 1), x:x + rng.integers(1, 4)] = True
    elif kind == 3:
        mask = rng.random(shape) > 0.9
    return mask


def test_dilate_equals_whole_frame_binary_dilation_on_small_shapes():
    from scipy.ndimage import binary_dilation

    rng = np.random.default_rng(15)
    for _ in range(400):
        shape = (int(rng.integers(1, 14)), int(rng.integers(1, 14)))
        radius = int(rng.integers(1, 12))
        mask = _random_shape(rng, shape)
        expected = binary_dilation(mask, structure=disk(radius))
        assert np.array_equal(dilate(mask, disk(radius)), expected), (shape, radius)


def test_f_measure_equals_the_plain_definition_on_small_and_thin_objects():
    rng = np.random.default_rng(16)
    for _ in range(300):
        shape = (int(rng.integers(2, 40)), int(rng.integers(2, 60)))
        truth, prediction = _random_shape(rng, shape), _random_shape(rng, shape)
        if rng.random() < 0.3:  # the truth shifted by up to 3 columns: a near match
            prediction = np.roll(truth, int(rng.integers(-3, 4)), axis=1)
        radius = boundary_tolerance((480, 854))  # 8 px: larger than most of these objects
        assert f_measure(prediction, truth) == pytest.approx(
            _plain_f(prediction, truth, boundary_tolerance(shape)), abs=1e-12)
        assert f_measure(prediction, truth, bound_th=radius) == pytest.approx(
            _plain_f(prediction, truth, radius), abs=1e-12)


def test_flat_object_thinner_than_the_tolerance_at_480p():
    truth = np.zeros((480, 854), bool)
    truth[200:203, 100:400] = True                    # 3 rows tall, tolerance 8 px
    prediction = np.roll(truth, 2, axis=1)
    assert f_measure(prediction, truth) == 1.0          # every boundary pixel within 8 px
    assert jaccard(prediction, truth) == pytest.approx(3 * 298 / (3 * 302))
    pixel = np.zeros((480, 854), bool)
    pixel[0, 853] = True                                # one pixel in a corner
    assert f_measure(pixel, pixel) == 1.0 and jaccard(pixel, pixel) == 1.0
    assert f_measure(np.zeros_like(pixel), pixel) == 0.0   # empty prediction: p = 1, r = 0 -> F = 0


def test_wrong_size_ground_truth_is_named_as_ground_truth(tmp_path):
    truth = _two_objects()
    root = _write_root(tmp_path / "davis", {"seq": truth})
    _write_predictions(tmp_path / "pred", "seq", truth)
    write_indexed_png(root / "Annotations" / "480p" / "seq" / "00002.png", truth[2][:-1])
    with pytest.raises(UserError, match=r"ground-truth mask .*seq/00002.png is 60 x 39"):
        score_davis(root, tmp_path / "pred", progress=False)


def test_cli_score_picks_the_only_list_as_eval(tmp_path, capsys):
    from fmapicon.cli import main

    truth = _two_objects()
    root = _write_root(tmp_path / "davis", {"seq": truth}, set_name="dev")
    (root / "ImageSets" / "2017" / "dev.txt").rename(root / "ImageSets" / "dev.txt")
    _write_predictions(tmp_path / "pred", "seq", truth)
    assert main(["score", "--davis", str(root), "--results", str(tmp_path / "pred")]) == 0
    assert "Global results for dev" in capsys.readouterr().out
    assert (tmp_path / "pred" / "global_results-dev.csv").is_file()


def _moving_and_still(frames=6):
    """(moving, still): a square that moves 3 px a frame, and one that stays put."""
    moving = np.zeros((frames, 40, 60), np.uint8)
    for t in range(frames):
        moving[t, 10:25, 5 + 3 * t:20 + 3 * t] = 1
    still = np.zeros((frames, 40, 60), np.uint8)
    still[:, 12:30, 20:40] = 1
    return moving, still


def test_a_repeated_sequence_counts_once_in_the_global_mean(tmp_path):
    moving, still = _moving_and_still()
    root = _write_root(tmp_path / "davis", {"moving": moving, "still": still})
    (root / "ImageSets" / "2017" / "val.txt").write_text("moving\nstill\nstill\n")
    for name, masks in (("moving", moving), ("still", still)):
        _write_predictions(tmp_path / "pred", name, np.repeat(masks[:1], len(masks), axis=0))  # the copy baseline
    once = score_davis(root, tmp_path / "pred", sequences=["moving", "still"], progress=False)
    with pytest.warns(UserWarning, match="still more than once"):
        listed = score_davis(root, tmp_path / "pred", progress=False)
    with pytest.warns(UserWarning, match="still more than once"):
        given = score_davis(root, tmp_path / "pred", sequences=["moving", "still", "still"], progress=False)
    assert once["global"]["J-Mean"] < 0.9  # the two sequences differ, so a double weight would show
    for result in (listed, given):
        assert result["global"] == once["global"]
        assert [o["Sequence"] for o in result["objects"]] == ["moving_1", "still_1"]


def test_companion_files_beside_frames_and_annotations_change_nothing(tmp_path):
    moving, still = _moving_and_still()
    clean = _write_root(tmp_path / "clean", {"moving": moving, "still": still})
    mac = _write_root(tmp_path / "mac", {"moving": moving, "still": still})
    for folder in [*(mac / "JPEGImages" / "480p").iterdir(), *(mac / "Annotations" / "480p").iterdir()]:
        for path in list(folder.iterdir()):
            (folder / f"._{path.name}").write_bytes(b"\0\x05\x16\x07" + b"\0" * 4092)  # AppleDouble, not an image
    (mac / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (mac / "Annotations" / "480p" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    _write_predictions(tmp_path / "pred", "moving", np.roll(moving, 1, axis=2))
    _write_predictions(tmp_path / "pred", "still", still)
    (tmp_path / "pred" / "moving" / "._00001.png").write_bytes(b"\0")
    results = [score_davis(root, tmp_path / "pred", progress=False) for root in (clean, mac)]
    assert results[0]["global"] == results[1]["global"] and results[0]["objects"] == results[1]["objects"]


def test_a_latin1_folder_name_round_trips_into_the_csvs(tmp_path, capsys):
    from fmapicon.cli import main

    latin = os.fsdecode(b"s\xe9q")  # the name as Python gives it: a surrogate for the byte 0xe9
    moving, still = _moving_and_still()
    root = _write_root(tmp_path / "davis", {"seqa": moving, latin: still})
    (root / "ImageSets" / "2017" / "val.txt").write_bytes(b"seqa\ns\xe9q\n")  # the list in Latin-1 too
    _write_predictions(tmp_path / "pred", "seqa", moving)
    _write_predictions(tmp_path / "pred", latin, still)
    assert main(["score", "--davis", str(root), "--results", str(tmp_path / "pred")]) == 0
    rows = (tmp_path / "pred" / "per-sequence_results-val.csv").read_bytes().splitlines()
    assert [row.split(b",")[0] for row in rows] == [b"Sequence", b"seqa_1", b"s\xe9q_1"]
    assert "s\\xe9q_1" in capsys.readouterr().out  # printed readably, not as a traceback
