"""Points as labels and their readout, PCK-T, the BADJA reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fmapicon.errors import UserError
from fmapicon.evaluation.keypoints import (BadjaSequence, pck_t, point_labels, read_badja, read_points,
                                           score_sequence, to_cells, to_pixels)


def test_cell_coordinates_put_cell_centres_at_integers_and_round_trip():
    size, grid = (480, 854), (60, 107)
    centre = to_pixels(np.array([[0.0, 0.0]]), size, grid)[0]
    assert centre == pytest.approx([854 / 107 / 2 - 0.5, 480 / 60 / 2 - 0.5])
    xy = np.array([[0.0, 0.0], [853.0, 479.0], [100.25, 33.5]])
    assert to_pixels(to_cells(xy, size, grid), size, grid) == pytest.approx(xy)


def test_a_splatted_point_reads_back_exactly_with_full_score():
    size, grid = (96, 128), (12, 16)
    xy = np.array([[37.3, 51.9], [4.0, 90.0], [64.0, 48.0]])       # between cells, near an edge, at a centre-ish
    labels = point_labels(xy, size, grid)
    assert labels.sum(dim=(1, 2)).tolist() == pytest.approx([1, 1, 1])
    found, score = read_points(labels, size)
    assert found == pytest.approx(xy, abs=1e-5)           # float32 labels
    assert score == pytest.approx([1, 1, 1])


def test_a_label_moved_by_whole_cells_reads_back_moved_by_those_pixels():
    size, grid = (80, 80), (10, 10)
    labels = point_labels(np.array([[30.0, 41.0]]), size, grid)
    found, _ = read_points(labels.roll(shifts=(2, -1), dims=(1, 2)), size)
    assert found[0] == pytest.approx([30.0 - 8, 41.0 + 16])


def test_pck_t_of_a_known_prediction():
    truth = np.array([[[10.0, 10.0], [50.0, 50.0], [90.0, 10.0]]] * 3)
    visible = np.array([[True, True, False], [True, True, True], [False, True, True]])
    sequence = BadjaSequence("toy", ["00000", "00005", "00010"], truth, visible)
    # area 400: threshold 0.2 * 20 = 4 pixels
    predicted = {"00005": truth[1] + [[3.9, 0], [0, 4.1], [0, 0]],   # hit, miss, (joint 2 not queried)
                 "00010": truth[2] + [[99, 99], [2, 2], [0, 0]]}     # (joint 0 invisible), hit
    result = score_sequence(sequence, predicted, {"00005": 400, "00010": 400})
    assert (result["joints"], result["correct"], result["pck_t"]) == (3, 2, pytest.approx(2 / 3))
    assert pck_t(np.array([[0, 3.99]]), np.zeros((1, 2)), 400).tolist() == [True]


def test_read_badja_scales_row_col_of_the_full_resolution_frames(tmp_path):
    entries = [{"image_path": "DAVIS/JPEGImages/Full-Resolution/x/00010.jpg", "joints": [[1080, 1920], [540, 0]],
                "visibility": [1, 0], "segmentation_path": "m.png"},
               {"image_path": "DAVIS/JPEGImages/Full-Resolution/x/00005.jpg", "joints": [[0, 0], [0, 0]],
                "visibility": [1, 1], "segmentation_path": "m.png"}]
    (tmp_path / "x.json").write_text(json.dumps(entries))
    sequence = read_badja(tmp_path / "x.json")
    assert sequence.frames == ["00005", "00010"]
    assert np.allclose(sequence.joints[1], [[1920 * 480 / 1080, 480.0], [0.0, 240.0]])
    assert sequence.visible.tolist() == [[True, True], [True, False]]


def test_badja_pixels_scores_the_shared_sequences(tmp_path, davis2016_root):
    from fmapicon.evaluation.keypoints import evaluate_badja
    from fmapicon.evaluation.propagate import PropagationParams

    badja = davis2016_root.parent / "badja"
    if not (badja / "dog-agility.json").is_file():
        pytest.skip("BADJA annotations not in the shared data")
    (tmp_path / "in").mkdir()
    for name in ("dog-agility", "not-in-davis"):           # the second is left out by the list of sequences
        (tmp_path / "in" / f"{name}.json").write_text((badja / "dog-agility.json").read_text())
    with pytest.raises(UserError, match="no BADJA annotation nosuch.json .* --sequences"):
        evaluate_badja("pixels", tmp_path / "in", davis2016_root, tmp_path / "out", sequences=["nosuch"])
    record = evaluate_badja("pixels", tmp_path / "in", davis2016_root, tmp_path / "out", PropagationParams(),
                            device="cpu", progress=False, sequences=["dog-agility"])
    assert list(record["sequences"]) == ["dog-agility"] and record["missing"] == []
    scored = record["sequences"]["dog-agility"]
    assert scored["joints"] > 10 and 0 < scored["pck_t"] <= 1 and record["pck_t_mean"] == scored["pck_t"]
    assert (tmp_path / "out" / "pck-per-sequence.csv").read_text().startswith("sequence,pck_t,joints")
