"""Tracking your own video: the same masks as eval, points that follow known motion,
memory that does not grow with the video, masks of objects that enter later."""

from __future__ import annotations

import numpy as np
import pytest

from fmapicon.data.davis import annotation_paths, layout, read_annotation
from fmapicon.data.flow import read_flo
from fmapicon.evaluation.davis_eval import evaluate_davis
from fmapicon.evaluation.propagate import PropagationParams
from fmapicon.evaluation.track import track

STRIDE = 4


def _first_sequence(root):
    images, annotations = layout(root)
    name = sorted(p.name for p in images.iterdir())[0]
    return name, images / name, annotation_paths(annotations, name)


def test_track_gives_evals_masks_on_a_davis_sequence(synth_root, tmp_path):
    evaluate_davis("pixels", synth_root, tmp_path / "eval", params=PropagationParams(stride=STRIDE), progress=False)
    _, images, truths = _first_sequence(synth_root)
    name = images.name
    results = list(track(images, masks=truths[0], model="pixels", stride=STRIDE))
    assert [r.index for r in results] == list(range(len(truths)))
    for result, truth in zip(results, truths):
        assert np.array_equal(result.ids, read_annotation(tmp_path / "eval" / name / truth.name))
    assert results[-1].ids.any() and results[0].points.shape == (0, 2)


def _true_track(flow_dir, xy, frames):
    """Positions of points through the exact forward flows (nearest pixel of the flow)."""
    positions = [np.asarray(xy, float)]
    for t in range(frames - 1):
        flow = read_flo(flow_dir / f"{t:05d}.flo")
        current = positions[-1]
        rows = np.clip(np.round(current[:, 1]).astype(int), 0, flow.shape[0] - 1)
        cols = np.clip(np.round(current[:, 0]).astype(int), 0, flow.shape[1] - 1)
        positions.append(current + flow[rows, cols])
    return np.stack(positions)


def test_points_follow_the_known_motion_within_a_cell(synth_root):
    name, images, truths = _first_sequence(synth_root)
    first = read_annotation(truths[0])
    # one point deep inside each object and two on the background, away from every edge
    points = []
    for object_id in sorted(set(np.unique(first)) - {0}):
        ys, xs = np.nonzero(first == object_id)
        points.append((np.median(xs), np.median(ys)))
    points += [(12.0, 12.0), (84.0, 84.0)]
    truth = _true_track(synth_root / "Flow" / name, points, len(truths))
    rows = [(0, x, y) for x, y in points]
    results = list(track(images, points=rows, model="pixels", stride=STRIDE))
    found = np.stack([r.points for r in results])
    assert np.array_equal(found[0], truth[0])
    error = np.linalg.norm(found - truth, axis=-1)
    assert error.max() < STRIDE, error.max(axis=0)
    assert np.all((results[-1].scores > 0) & (results[-1].scores <= 1))


def _frames(count, size=48, seed=0):
    rng = np.random.default_rng(seed)
    texture = rng.integers(0, 256, size=(size, size + count, 3), dtype=np.uint8)
    return [texture[:, t:t + size] for t in range(count)]          # a texture sliding left


def test_memory_is_bounded_by_the_context_not_the_video_length():
    first = np.zeros((48, 48), np.uint8)
    first[10:30, 10:30] = 1
    peaks = []
    for count in (12, 120):
        tracking = track(_frames(count), masks=first, model="pixels", stride=STRIDE, context=3, batch_size=2)
        assert sum(1 for _ in tracking) == count
        peaks.append(tracking.stats["peak_retained"])
    assert peaks[0] == peaks[1] <= 2 * (3 + 2) + 2


def test_a_later_mask_adds_its_objects_from_its_frame_on():
    frames = _frames(10)
    first = np.zeros((48, 48), np.uint8)
    first[10:30, 10:30] = 1
    later = np.zeros((48, 48), np.uint8)
    later[34:44, 30:44] = 2
    results = list(track(frames, masks={0: first, 5: later}, model="pixels", stride=STRIDE, context=3))
    assert all(2 not in r.ids for r in results[:5])
    assert np.array_equal(results[5].ids == 2, later == 2)
    assert (results[6].ids == 2).sum() > 50 and (results[-1].ids == 2).any() and (results[-1].ids == 1).sum() > 200


def test_points_before_their_frame_are_nan_and_frames_before_the_first_annotation_blank():
    frames = _frames(8)
    results = list(track(frames, points=[(3, 20.0, 21.0), (5, 30.0, 10.0)], model="pixels", stride=STRIDE))
    assert np.isnan(results[2].points).all() and np.isnan(results[4].points[1]).all()
    assert results[3].points[0].tolist() == [20.0, 21.0] and results[3].scores[0] == 1.0
    assert np.isfinite(results[7].points).all()


def test_bad_inputs_are_user_errors(tmp_path):
    from fmapicon.errors import UserError

    frames = _frames(4)
    with pytest.raises(UserError, match="30 x 20 pixels but the frames are 48 x 48"):
        list(track(frames, masks=np.zeros((20, 30), np.uint8), model="pixels"))
    with pytest.raises(UserError, match="frame 9 but the video has 4 frames"):
        list(track(frames, masks={9: np.zeros((48, 48), np.uint8)}, model="pixels"))
    with pytest.raises(UserError, match="outside the 48 x 48 frames"):
        list(track(frames, points=[(0, 60.0, 3.0)], model="pixels"))
    with pytest.raises(ValueError, match="masks or points"):
        track(frames, model="pixels")


def test_an_object_that_earlier_frames_show_as_background_is_followed_from_its_mask_on(synth_root):
    _, images, truths = _first_sequence(synth_root)
    truth = [read_annotation(p) for p in truths]
    first, later = np.where(truth[0] == 1, 1, 0), np.where(truth[4] == 2, 2, 0)   # object 2 visible from frame 0
    results = list(track(images, masks={0: first, 4: later}, model="pixels", stride=STRIDE))
    for result, expected in zip(results[5:], truth[5:]):
        overlap = ((result.ids == 2) & (expected == 2)).sum() / ((result.ids == 2) | (expected == 2)).sum()
        assert overlap > 0.6, (result.index, overlap)
