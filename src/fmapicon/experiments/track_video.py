"""A track's outputs (``fmapicon track``): ``write_track`` runs
``fmapicon.evaluation.track.track`` and writes, into a staging folder published whole at
the end (a failed or interrupted run leaves ``out`` as it was)::

    masks/<frame>.png    indexed ids, DAVIS palette (<frame>: the frame file's stem, or 00000...)
    points.csv           id,frame,x,y,score: one row per point and frame from its own frame on
    overlay.mp4          masks blended and outlined, points with short trails (H.264, yuv420p)
    track.json           source, model, protocol (the values used), threads, frames, timings,
                         peak_retained_frames (images and feature maps held at once, each
                         counted: about twice the context), written last

The overlay is encoded through PyAV (the optional ``av`` extra).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import torch

OUTPUTS = ("masks", "points.csv", "overlay.mp4", "track.json")
TRAIL = 8          # frames of a point's trail
POINT_RADIUS = 3   # pixels


def point_colours(count: int) -> np.ndarray:
    """``count x 3`` uint8 colours, evenly spaced hues (matplotlib's hsv map)."""
    from fmapicon.experiments.figures import heat_colors

    return heat_colors(np.arange(count) / max(count, 1), 1.0, cmap="hsv").reshape(-1, 3)


def draw_points(image: np.ndarray, trails: list, colours: np.ndarray) -> np.ndarray:
    """``image`` (``H x W x 3`` uint8) with each point's trail (a list of (x, y), newest last,
    NaN skipped) as a line and its newest position as a dot."""
    from PIL import Image, ImageDraw

    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    for trail, colour in zip(trails, colours):
        path = [(float(x), float(y)) for x, y in trail if np.isfinite(x) and np.isfinite(y)]
        colour = tuple(int(c) for c in colour)
        if len(path) > 1:
            draw.line(path, fill=colour, width=2)
        if path and np.isfinite(trail[-1][0]):
            x, y = path[-1]
            draw.ellipse((x - POINT_RADIUS, y - POINT_RADIUS, x + POINT_RADIUS, y + POINT_RADIUS), fill=colour,
                         outline=(255, 255, 255))
    return np.asarray(picture)


class OverlayVideo:
    """Write frames with masks and points into an H.264 mp4: ``add(frame, ids, points)``
    per frame (``ids`` ``H x W`` or None, ``points`` ``P x 2`` pixels, NaN where absent), then
    ``close()``. Odd frame sizes are padded by one edge row or column (4:2:0 needs even)."""

    def __init__(self, path, fps: float = 24.0, points: int = 0):
        from fmapicon.runtime import require

        self.av = require("av")
        self.path = Path(path)
        self.container = self.av.open(str(self.path), mode="w", format="mp4")
        codec = "libx264" if "libx264" in self.av.codecs_available else "mpeg4"
        self.stream = self.container.add_stream(codec, rate=max(1, int(round(fps))))
        self.stream.pix_fmt = "yuv420p"
        self.trails = [deque(maxlen=TRAIL) for _ in range(points)]
        self.colours = point_colours(points)
        self.frames = 0

    def add(self, frame: np.ndarray, ids=None, points=None) -> None:
        from fmapicon.experiments.figures import overlay_mask

        image = overlay_mask(frame, ids) if ids is not None else np.asarray(frame, np.uint8)
        if points is not None and len(points):
            for trail, xy in zip(self.trails, points):
                trail.append(tuple(xy))
            image = draw_points(image, [list(t) for t in self.trails], self.colours)
        height, width = image.shape[:2]
        image = np.pad(image, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        if self.frames == 0:
            self.stream.width, self.stream.height = image.shape[1], image.shape[0]
        for packet in self.stream.encode(self.av.VideoFrame.from_ndarray(np.ascontiguousarray(image), "rgb24")):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def write_track(source, out, *, masks=None, points=None, model="reference", params=None, device="auto",
                overlay: bool = True, progress: bool = True) -> dict:
    """Track ``source`` (see ``fmapicon.evaluation.track.track``) and write the outputs above
    into ``out`` through ``fmapicon.runtime.staged_output`` (an earlier track's outputs are
    replaced only when the new one is complete, track.json last; other files are kept);
    returns track.json's record."""
    import dataclasses

    from fmapicon.evaluation.propagate import PropagationParams
    from fmapicon.runtime import staged_output

    params = params or PropagationParams()
    with staged_output(out, force=True, outputs=OUTPUTS, last=("track.json",)) as staging:
        record = _write_into(staging, source, masks, points, model, dataclasses.asdict(params), device, overlay,
                             progress)
    return record


def _write_into(staging: Path, source, masks, points, model, protocol: dict, device, overlay: bool,
                progress: bool) -> dict:
    import csv
    import dataclasses
    import time

    from tqdm import tqdm

    from fmapicon.data.davis import write_indexed_png
    from fmapicon.data.sources import stated_frames, video_rate
    from fmapicon.evaluation.track import track
    from fmapicon.runtime import write_json

    tracking = track(source, masks=masks, points=points, model=model, device=device, **protocol)
    protocol = dataclasses.asdict(tracking.params)  # the values used (the model's defaults in place)
    protocol["input_scale"] = protocol["input_scale"] or tracking.model.default_input_scale
    is_video = Path(str(source)).is_file()
    fps = (video_rate(source) if is_video else None) or 24.0
    video = OverlayVideo(staging / "overlay.mp4", fps, len(tracking.point_ids)) if overlay else None
    start = time.perf_counter()
    total = tracking.count or (stated_frames(source) if is_video else None)
    with tqdm(total=total, desc="track", unit="frame", leave=False, disable=not progress) as bar, \
            open(staging / "points.csv", "w", newline="") as handle:
        rows = csv.writer(handle)
        rows.writerow(["id", "frame", "x", "y", "score"])
        for result in tracking:
            name = tracking.names[result.index] if tracking.names else f"{result.index:05d}"
            if result.ids is not None:
                write_indexed_png(staging / "masks" / f"{name}.png", result.ids)
            for pid, (x, y), score in zip(tracking.point_ids, result.points, result.scores):
                if np.isfinite(x):
                    rows.writerow([pid, result.index, f"{x:.2f}", f"{y:.2f}", f"{score:.4f}"])
            if video is not None:
                video.add(result.frame, result.ids, result.points)
            bar.update(1)
    if video is not None:
        video.close()
    if not tracking.point_ids:
        (staging / "points.csv").unlink()
    stats = tracking.stats
    record = {"source": str(source), "model": getattr(tracking.model, "name", str(model)), "protocol": protocol,
              "input_scale": protocol["input_scale"], "threads": torch.get_num_threads(),
              "masks": {str(f): name for f, (_, name) in tracking.masks.items()},
              "points": len(tracking.point_ids), "frames": stats["frames"],
              "timings": {"features_s": stats["features_s"], "propagation_s": stats["propagation_s"],
                          "total_s": time.perf_counter() - start},
              "peak_retained_frames": stats["peak_retained"], "overlay": video is not None}
    write_json(staging / "track.json", record)
    return record
