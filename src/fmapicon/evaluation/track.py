"""Tracking objects and points through your own video: ``track(frames, masks=..., points=...)``.

The frames stream through the CRW protocol of ``fmapicon.evaluation.propagate``
(``propagate_frames``: features computed as frames arrive, dropped once no later frame's
context holds them), with the objects of the masks and each point as labels of one
propagation (one feature pass for both; points: ``fmapicon.evaluation.keypoints``).

Contract:
- The propagation starts at the first annotated frame (the earliest mask or point); the
  frames before it get all-background ids and no points. On a DAVIS sequence with its
  first mask this gives exactly ``fmapicon eval``'s masks.
- The first mask frame's mask is the truth there (void 255 read as background). A later
  mask (``masks={n: ...}``: objects entering at frame n, as in DAVIS-2017) sets its
  non-zero ids at frame n; its zero pixels keep the propagated ids. Frame n then starts
  the short-term context afresh, as the first frame does (``LabelStream``'s restarts: the
  frames after n see copies of n in place of the frames before it), so that an object the
  earlier frames showed as background is followed from n on; the first frame stays the
  long-term memory.
- A point tracks from its own frame on; before it, its position and score are NaN.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from fmapicon.errors import UserError
from fmapicon.evaluation.keypoints import point_labels, read_points
from fmapicon.evaluation.propagate import VOID, PropagationParams, labels_to_ids, propagate_frames, soft_labels


@dataclass
class TrackFrame:
    """One frame's result.

    index : the frame's number in the video (0-based)
    frame : ``H x W x 3`` uint8, the frame itself
    ids : ``H x W`` uint8 object ids (0 background), None when no masks were given
    points : ``P x 2`` float (x, y) pixels, NaN before a point's frame
    scores : ``P`` confidence in [0, 1] (``keypoints.read_points``), NaN before a point's frame
    """

    index: int
    frame: np.ndarray
    ids: np.ndarray | None
    points: np.ndarray
    scores: np.ndarray


@dataclass
class Points:
    """Query points: ``frames`` (``N`` ints), ``xy`` (``N x 2`` pixels), ``ids`` (``N`` names)."""

    frames: np.ndarray
    xy: np.ndarray
    ids: list
    source: str = "points"


def read_point_file(path) -> Points:
    """A CSV of query points with a header: columns ``frame,x,y`` and an optional ``id``
    (pixels of the source's frames, frames counted from 0). Raises ``UserError`` naming
    the file and the line for a missing column, a value that is not a number or a
    negative frame."""
    path = Path(path)
    try:
        with open(path, newline="") as handle:
            table = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"cannot read the points file {path}: {error}") from error
    header = [cell.strip().lower() for cell in table[0]] if table else []
    missing = [c for c in ("frame", "x", "y") if c not in header]
    if missing:
        raise UserError(f"the points file {path} has no column {', '.join(missing)}: expected a header line "
                        "frame,x,y (and optionally id), then one point per line")
    rows = [dict(zip(header, row)) for row in table[1:]]
    if not rows:
        raise UserError(f"the points file {path} holds no points: add lines frame,x,y after the header")
    frames, xy, ids = [], [], []
    for line, row in enumerate(rows, start=2):
        row = {k: (v or "").strip() for k, v in row.items()}
        row.update({k: row.get(k, "") for k in ("frame", "x", "y")})
        try:
            frame, x, y = float(row["frame"]), float(row["x"]), float(row["y"])
        except ValueError:
            raise UserError(f"{path} line {line}: frame, x and y must be numbers, got {row['frame']!r}, "
                            f"{row['x']!r}, {row['y']!r}") from None
        if frame != int(frame) or frame < 0 or not (np.isfinite(x) and np.isfinite(y)):
            raise UserError(f"{path} line {line}: the frame must be a whole number >= 0 and x, y finite, got "
                            f"frame {row['frame']!r}, x {row['x']!r}, y {row['y']!r}")
        frames.append(int(frame))
        xy.append((x, y))
        ids.append(row.get("id") or str(len(ids)))
    return Points(np.array(frames), np.array(xy, dtype=np.float64), ids, str(path))


def _points(points) -> Points:
    if points is None:
        return Points(np.zeros(0, int), np.zeros((0, 2)), [])
    if isinstance(points, Points):
        return points
    if isinstance(points, (str, Path)):
        return read_point_file(points)
    table = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    return Points(table[:, 0].astype(int), table[:, 1:], [str(i) for i in range(len(table))])


def _masks(masks) -> dict:
    """``{frame: (ids H x W uint8, name)}`` from an array or path (frame 0), or a dict
    ``{frame: array or path}``; paths are read with one annotation style (as ``eval``)."""
    from fmapicon.data.davis import annotation_style, read_annotation

    if masks is None:
        return {}
    if not isinstance(masks, dict):
        masks = {0: masks}
    paths = [Path(m) for m in masks.values() if isinstance(m, (str, Path))]
    style = annotation_style(paths) if paths else None
    table = {}
    for frame, mask in sorted(masks.items()):
        if int(frame) != frame or frame < 0:
            raise UserError(f"a mask frame must be a whole number >= 0, got {frame!r}")
        if isinstance(mask, (str, Path)):
            table[int(frame)] = (read_annotation(Path(mask), style), str(mask))
        else:
            table[int(frame)] = (np.asarray(mask).astype(np.uint8), f"the mask of frame {frame}")
    return table


def open_frames(source) -> tuple[Iterator[np.ndarray], int | None, list | None]:
    """Frames of ``source``: a video file (``fmapicon.data.sources.video_frames``), a folder of
    frames (``frame_files``, read one at a time with ``fmapicon.data.images.read_image``) or an
    iterable of ``H x W x 3`` uint8 arrays; with the frame count when it is known up front
    and, for a folder, the frame files' stems (else None)."""
    from fmapicon.data.images import read_image
    from fmapicon.data.sources import frame_files, video_frames

    if not isinstance(source, (str, Path)):
        return iter(source), len(source) if hasattr(source, "__len__") else None, None
    path = Path(source)
    if path.is_dir():
        files = frame_files(path)
        if not files:
            raise UserError(f"no image files in {path}: give a folder of frames (.jpg, .png, ...) or a video file")
        return (read_image(p) for p in files), len(files), [p.stem for p in files]
    if not path.is_file():
        raise UserError(f"{path} does not exist: give a video file or a folder of frames")
    return video_frames(path), None, None


class Tracking:
    """The iterator ``track`` returns: yields a ``TrackFrame`` per frame, in order.
    ``point_ids`` names the points; ``names`` the frames of a folder (their files' stems;
    None for other sources); ``stats`` holds ``frames``, ``features_s``,
    ``propagation_s`` (seconds) and ``peak_retained`` (the most frames whose images or
    features were held at once) once iterated."""

    def __init__(self, frames, masks, points, model, params: PropagationParams):
        self.frames, self.count, self.names = open_frames(frames)
        self.masks, self.points, self.model, self.params = _masks(masks), _points(points), model, params
        self.point_ids = list(self.points.ids)
        annotated = [*self.masks, *self.points.frames.tolist()]
        if not annotated:
            raise ValueError("track needs masks or points to follow")
        self.start = min(annotated)
        self.first_mask = min(self.masks) if self.masks else None
        self.classes = max(int(np.where(m == VOID, 0, m).max()) for m, _ in self.masks.values()) + 1 if self.masks else 0
        self.stats = {"frames": 0, "features_s": 0.0, "propagation_s": 0.0, "peak_retained": 0}
        if self.count is not None:
            self._check_end(self.count)

    def __iter__(self) -> Iterator[TrackFrame]:
        frames = iter(self.frames)
        for t in range(self.start):
            frame = next(frames, None)
            if frame is None:
                self._check_end(t)
            frame = self._check_first(np.asarray(frame)) if t == 0 else np.asarray(frame)
            yield self._blank(t, frame)
        first = next(frames, None)
        if first is None:
            self._check_end(self.start)
        if self.start == 0:
            self._check_first(np.asarray(first))
        size = self.size = np.asarray(first).shape[:2]
        with torch.no_grad():
            restarts = [f - self.start for f in self.masks if f != self.first_mask]   # later masks
            stream = propagate_frames(self.model, itertools.chain([first], frames), self._annotate, self.params,
                                      self.stats, restarts)
            for t, frame, labels in stream:
                yield self._result(self.start + t, frame, labels, size)
                self.stats["frames"] = self.start + t + 1
        self._check_end(self.stats["frames"])

    def _check_first(self, frame: np.ndarray) -> np.ndarray:
        height, width = frame.shape[:2]
        for ids, name in self.masks.values():
            if ids.shape != (height, width):
                raise UserError(f"the mask {name} is {ids.shape[1]} x {ids.shape[0]} pixels but the frames are "
                                f"{width} x {height}: give a mask of the frames' size")
        outside = (self.points.xy < -0.5) | (self.points.xy > np.array([width, height]) - 0.5)
        if outside.any():
            n = int(np.flatnonzero(outside.any(axis=1))[0])
            raise UserError(f"point {self.points.ids[n]} of {self.points.source} at x={self.points.xy[n, 0]:g}, "
                            f"y={self.points.xy[n, 1]:g} lies outside the {width} x {height} frames: give pixel "
                            f"coordinates within 0..{width - 1}, 0..{height - 1}")
        return frame

    def _check_end(self, count: int) -> None:
        late = [(f, name) for f, (_, name) in self.masks.items() if f >= count]
        late += [(int(f), f"point {i} of {self.points.source}") for f, i in zip(self.points.frames, self.points.ids)
                 if f >= count]
        if late:
            frame, name = min(late)
            raise UserError(f"{name} is for frame {frame} but the video has {count} frames (0..{count - 1}): "
                            "give a frame number within the video")

    def _blank(self, t: int, frame: np.ndarray) -> TrackFrame:
        count = len(self.point_ids)
        ids = np.zeros(frame.shape[:2], np.uint8) if self.masks else None
        return TrackFrame(t, frame, ids, np.full((count, 2), np.nan), np.full(count, np.nan))

    def _annotate(self, t: int, labels, grid):
        """The labels of frame ``start + t``: the first frame's built, later ones amended."""
        t += self.start
        if labels is None:
            self.grid = tuple(grid)
            labels = torch.zeros(self.classes + len(self.point_ids), *grid, device=self.model.device)
        if t in self.masks:
            mask = soft_labels(self.masks[t][0], self.grid, labels.device, self.classes)
            if t == self.first_mask:
                labels[: self.classes] = mask
            else:  # the later mask's objects replace what was there, its background keeps it
                mask[0] = 0
                cover = mask.sum(dim=0)
                labels[: self.classes] = labels[: self.classes] * (1 - cover) + mask
        starting = np.flatnonzero(self.points.frames == t)
        if len(starting):
            labels[self.classes + starting] = point_labels(self.points.xy[starting], self.size, self.grid,
                                                           labels.device)
        return labels

    def _result(self, t: int, frame: np.ndarray, labels: torch.Tensor, size) -> TrackFrame:
        result = self._blank(t, frame)
        if self.masks and t >= self.first_mask:
            mask = self.masks.get(t, (None,))[0]
            result.ids = np.where(mask == VOID, 0, mask).astype(np.uint8) if t == self.first_mask else \
                labels_to_ids(labels[: self.classes], size)
            if mask is not None and t != self.first_mask:
                result.ids = np.where((mask > 0) & (mask != VOID), mask, result.ids).astype(np.uint8)
        if self.point_ids:
            xy, scores = read_points(labels[self.classes:], size)
            started, exact = self.points.frames < t, self.points.frames == t
            result.points[started], result.scores[started] = xy[started], scores[started]
            result.points[exact], result.scores[exact] = self.points.xy[exact], 1.0
        return result


def track(frames, masks=None, points=None, model="reference", device="auto", **protocol) -> Tracking:
    """Track the objects of masks and points through frames; iterate the result for the frames.

    Parameters
    ----------
    frames : a video file, a folder of frames, or an iterable of ``H x W x 3`` uint8 arrays
    masks : the annotated frame's object ids: an ``H x W`` array or a mask file (indexed,
        0/255 or DAVIS-coloured PNG, read as ``eval`` reads annotations) for frame 0, or a
        dict ``{frame: array or file}`` (later frames: objects entering or added there; each
        restarts the short-term context, see the module docstring)
    points : query points: a CSV file (``read_point_file``), ``N x 3`` rows ``(frame, x, y)``
        in pixels, or ``Points``
    model : ``reference`` (shipped), a run folder or checkpoint, ``pixels``, ``random``, or a
        ``FeatureModel``
    device : where features and affinities are computed (``auto``: CUDA when available)
    protocol : ``PropagationParams`` fields (``context``, ``radius``, ``topk``,
        ``temperature``, ``input_scale``, ``stride``, ``pixels_weight``, ...); CRW only

    Returns a ``Tracking`` (yields ``TrackFrame`` per frame). Raises ``UserError`` for masks
    of another size than the frames, points outside them, annotated frames beyond the
    video's end, unreadable sources; ``ValueError`` without masks and points.
    """
    from fmapicon.evaluation.features import load_model
    from fmapicon.runtime import resolve_device

    params = PropagationParams(**protocol).checked()
    if params.protocol != "crw":
        raise ValueError(f"track follows the crw protocol, got protocol={params.protocol!r}")
    if not hasattr(model, "default_input_scale"):
        device = resolve_device(device) if isinstance(device, str) else device
        model = load_model(model, device, stride=params.stride)
    return Tracking(frames, masks, points, model, params.with_model_defaults(model))
