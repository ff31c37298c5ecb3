"""Where training frames come from: scanning video files and folders of frames into clips,
the frame-count index (a JSON cache), the project's natural frame order, and decoding a
pair of frames from a video (PyAV: seek to the keyframe at or before A, decode to B).

Folders are listed by the project's one rule (``fmapicon.paths.visible_entries``: names
starting with ``.`` are not data). Bad files, dangling links included, are skipped with one
``SkippedFileWarning`` each and counted in a ``ScanReport``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from fmapicon.paths import display_path, visible_entries, visible_files


VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v"})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".tif", ".tiff"})
INDEX_FILE = "frame_index.json"
INDEX_VERSION = 2


class SkippedFileWarning(UserWarning):
    """A file or folder that cannot serve as a clip (one warning per file)."""


class PairReadError(RuntimeError):
    """The frames of one drawn pair could not be decoded."""


@dataclass
class Clip:
    """One sequence of frames.

    ``kind`` is ``video`` (``path`` a file), ``frames`` (``path`` a folder, ``files`` the
    frame names in order) or ``synth`` (``scene`` the scene number, ``path`` a label).
    """

    kind: str
    path: str
    frames: int
    width: int
    height: int
    files: list = field(default_factory=list)
    scene: int = -1


@dataclass
class ScanReport:
    """What scanning the sources found: skipped files by reason, other files, index use."""

    skipped: Counter = field(default_factory=Counter)
    skipped_files: list = field(default_factory=list)
    other_files: int = 0
    index_hits: int = 0
    index_misses: int = 0

    def skip(self, path, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.skipped_files.append({"path": str(path), "reason": reason, "detail": detail})
        detail = " ".join(str(detail).split())  # one line, whatever the decoder said
        message = f"skipping {display_path(path)}: {reason.replace('_', ' ')}" + (f" ({detail})" if detail else "")
        warnings.warn(message, SkippedFileWarning, stacklevel=4)


def cache_path(cache_dir) -> Path | None:
    if cache_dir is False:
        return None
    if cache_dir is None:
        cache_dir = os.environ.get("FMAPICON_CACHE") or Path.home() / ".cache" / "fmapicon"
    return Path(cache_dir).expanduser() / INDEX_FILE


def nothing_usable(path: Path, report: ScanReport, before: dict) -> str:
    new = {k: v - before.get(k, 0) for k, v in report.skipped.items() if v - before.get(k, 0)}
    found = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in sorted(new.items())) or "no video or image files"
    return (f"no usable clip in {path}: skipped {found}; a clip is a video file "
            f"({' '.join(sorted(VIDEO_EXTENSIONS))}) or a folder of at least 2 images")


# ---------------------------------------------------------------------------------------
# the frame-count index


class FrameIndex:
    """A JSON map from an absolute path to what probing it found, valid while its stamp
    (size and modification time, or for a folder its image count, total size and newest
    modification time) is unchanged. Saved atomically; a broken or unwritable index only
    costs time."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict = {}
        self.changed = False
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
                if data.get("version") == INDEX_VERSION:
                    self.entries = data.get("entries", {})
            except (OSError, ValueError):
                self.entries = {}

    def get(self, key: str, stamp: list):
        entry = self.entries.get(key)
        return entry if entry is not None and entry.get("stamp") == stamp else None

    def put(self, key: str, stamp: list, entry: dict) -> None:
        self.entries[key] = {**entry, "stamp": stamp}
        self.changed = True

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        from fmapicon.runtime import write_json

        try:
            merged = FrameIndex(self.path).entries  # keep what another process saved meanwhile
            merged.update(self.entries)
            write_json(self.path, {"version": INDEX_VERSION, "entries": merged}, indent=None)
            self.changed = False
        except OSError as error:
            warnings.warn(f"cannot save the frame index {self.path} ({error}); the next start will probe again")


# ---------------------------------------------------------------------------------------
# scanning


def natural_key(name) -> tuple:
    """The one frame-ordering rule of the project (training scans, evaluation, scoring):
    natural order, the runs of digits in a name compared as numbers, the rest without case
    (``2.jpg`` < ``10.jpg``, ``frame9`` < ``frame10``); the name itself breaks ties
    (``01.jpg`` vs ``1.jpg``). Zero-padded names (DAVIS) keep their string order.

    ``name``: a string or a path (its file name is used).
    """
    name = name.name if isinstance(name, os.PathLike) else str(name)
    parts = re.split(r"(\d+)", name)
    return tuple(int(part) if i % 2 else part.lower() for i, part in enumerate(parts)) + (name,)


_natural_key = natural_key


def natural_sorted(items) -> list:
    """``items`` (names or paths) sorted by ``natural_key``."""
    return sorted(items, key=natural_key)


def scan_path(path: Path, index: FrameIndex, report: ScanReport) -> list[Clip]:
    """All clips under ``path`` (a video file, an image folder, or a tree of them)."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in VIDEO_EXTENSIONS:
            clip = _video_clip(path, index, report)
            return [clip] if clip else []
        reason = "too_short" if suffix in IMAGE_EXTENSIONS else "not_media"
        report.skip(path, reason, "a single image is not a clip" if reason == "too_short" else "unknown extension")
        return []
    return _scan_folder(path, index, report, set())


def _scan_folder(folder: Path, index: FrameIndex, report: ScanReport, visited: set) -> list[Clip]:
    real = folder.resolve()
    if real in visited:  # a symbolic link loop
        return []
    visited.add(real)
    davis = folder / "JPEGImages"
    if davis.is_dir():
        inner = davis / "480p" if (davis / "480p").is_dir() else davis
        return _scan_folder(inner, index, report, visited)
    try:
        entries = sorted(visible_entries(folder), key=lambda e: natural_key(e.name))  # the one listing rule
    except OSError as error:
        report.skip(folder, "unreadable_folder", str(error))
        return []
    clips, images = [], []
    for entry in entries:
        suffix = os.path.splitext(entry.name)[1].lower()
        if entry.is_symlink() and not os.path.exists(entry.path):
            report.skip(Path(entry.path), "broken_link", f"a link to {display_path(os.readlink(entry.path))}, "
                        "which does not exist")
        elif entry.is_dir():
            clips += _scan_folder(Path(entry.path), index, report, visited)
        elif suffix in IMAGE_EXTENSIONS:
            images.append(entry)
        elif suffix in VIDEO_EXTENSIONS:
            clip = _video_clip(Path(entry.path), index, report)
            clips += [clip] if clip else []
        else:
            report.other_files += 1
    if images:
        clip = _frames_clip(folder, images, index, report)
        clips = ([clip] if clip else []) + clips
    return clips


def _frames_clip(folder: Path, images: list, index: FrameIndex, report: ScanReport) -> Clip | None:
    """One clip from the images directly in ``folder``, unreadable ones skipped."""
    stats = [entry.stat() for entry in images]
    stamp = [len(images), sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)]
    entry = index.get(str(folder), stamp)
    if entry is None:
        report.index_misses += 1
        entry = _probe_frames(folder, [e.name for e in images], [s.st_size for s in stats])
        index.put(str(folder), stamp, entry)
    else:
        report.index_hits += 1
    for name, reason, detail in entry["bad"]:
        report.skip(folder / name, reason, detail)
    if len(entry["files"]) < 2:
        report.skip(folder, "too_short", f"{len(entry['files'])} readable image(s), a clip needs 2")
        return None
    return Clip("frames", str(folder), len(entry["files"]), entry["width"], entry["height"], files=entry["files"])


def _probe_frames(folder: Path, names: list, sizes: list) -> dict:
    """Open each image's header: the readable frames, the bad ones with reasons, the frame size."""
    good, bad, shape = [], [], None
    for name, nbytes in zip(names, sizes):
        if nbytes == 0:
            bad.append([name, "zero_bytes", ""])
            continue
        try:
            with Image.open(folder / name) as image:  # reads the header only
                shape = shape or image.size
            good.append(name)
        except Exception as error:  # noqa: BLE001 - PIL raises many types for bad files
            bad.append([name, "unreadable_image", f"{type(error).__name__}: {error}"])
    width, height = shape or (0, 0)
    return {"kind": "frames", "files": good, "bad": bad, "width": width, "height": height}


def _video_clip(path: Path, index: FrameIndex, report: ScanReport) -> Clip | None:
    from fmapicon.runtime import require

    require("av")  # a missing PyAV is the user's to fix, not a verdict on the file to cache
    stat = path.stat()
    stamp = [stat.st_size, stat.st_mtime_ns]
    entry = index.get(str(path), stamp)
    if entry is None:
        report.index_misses += 1
        entry = _probe_video(path, stat.st_size)
        index.put(str(path), stamp, entry)
    else:
        report.index_hits += 1
    if entry.get("error"):
        report.skip(path, entry["error"], entry.get("detail", ""))
        return None
    if entry["frames"] < 2:
        report.skip(path, "too_short", f"{entry['frames']} frame(s), a clip needs 2")
        return None
    return Clip("video", str(path), entry["frames"], entry["width"], entry["height"])


# ---------------------------------------------------------------------------------------
# video


def _open_video(path):
    """Open a video container with PyAV (one place, so that tests can count the opens)."""
    from fmapicon.runtime import require

    av = require("av")
    return av.open(str(path), metadata_errors="ignore")


def _probe_video(path: Path, nbytes: int) -> dict:
    """Frame count (the container's when it states one, else the video packets counted) and
    the frame size as a player shows it (rotation and sample aspect ratio applied), after
    decoding the first frame to prove the file is a readable video. Packets before the first
    frame that decodes (a video cut mid-GOP without re-encoding) are not counted as frames."""
    if nbytes == 0:
        return {"kind": "video", "error": "zero_bytes", "detail": ""}
    try:
        with _open_video(path) as container:
            if not container.streams.video:
                return {"kind": "video", "error": "no_video_stream", "detail": "the file has no video stream"}
            stream = container.streams.video[0]
            count = int(stream.frames) if stream.frames and stream.frames > 0 else None
            first, stamps = _first_frame(container, stream, count_all=count is None)
            if first is None:
                return {"kind": "video", "error": "unreadable_video", "detail": "no frame decodes"}
            width, height = displayed_image(first, stream).size
        count = (len(stamps) if count is None else count) - _lead(stamps, first.pts)
    except Exception as error:  # noqa: BLE001 - PyAV raises many types for broken files
        return {"kind": "video", "error": "unreadable_video", "detail": f"{type(error).__name__}: {error}"}
    return {"kind": "video", "error": None, "frames": int(count), "width": width, "height": height}


def _first_frame(container, stream, count_all: bool):
    """(the first frame that decodes or None, the timestamps of the packets demuxed): up to
    that frame, or every packet of the stream when ``count_all``."""
    first, stamps = None, []
    for packet in container.demux(stream):
        if packet.size:
            stamps.append(packet.pts)
        if first is None:
            decoded = packet.decode()  # the empty packet at the end flushes the decoder
            first = decoded[0] if decoded else None
        elif not count_all:
            break
    return first, stamps


def _lead(stamps, first_pts) -> int:
    """How many of the packets' timestamps ``stamps`` come before the first decoded frame's."""
    if first_pts is None:
        return 0
    return sum(1 for pts in stamps if pts is not None and pts < first_pts)


def displayed_image(frame, stream=None) -> Image.Image:
    """A decoded PyAV frame as a player shows it, as a PIL RGB image: the stream's sample
    aspect ratio applied (the width resized by it, so pixels come out square) and the
    display rotation of the container's display matrix applied (``frame.rotation`` degrees
    counter-clockwise)."""
    image = frame.to_image()
    sar = getattr(stream, "sample_aspect_ratio", None) if stream is not None else None
    if sar and float(sar) > 0 and sar != 1:
        width = max(1, int(round(image.width * float(sar))))
        image = image.resize((width, image.height), Image.BILINEAR)
    rotation = int(round(float(getattr(frame, "rotation", 0) or 0))) % 360
    turn = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}
    if rotation in turn:
        image = image.transpose(turn[rotation])
    elif rotation:
        image = image.rotate(rotation, expand=True, resample=Image.BILINEAR)
    return image


_TIMESTAMPS: dict = {}


def frame_timestamps(path) -> tuple | None:
    """The presentation timestamps of the video's frames in presentation order (frame i has
    the i-th smallest), from the packets (demuxed; only the first frame is decoded), cached
    per file version; None when some packet carries no timestamp (then frames are counted
    while decoding). Frames before the first one that decodes are no frames (a video cut
    without re-encoding, mid-GOP, starts with frames whose keyframe was cut off)."""
    return _timing(path)[0]


def undecodable_lead(path) -> int:
    """How many frames of the video's packets come before the first frame that decodes."""
    return _timing(path)[1]


def _timing(path) -> tuple:
    """(``frame_timestamps``, ``undecodable_lead``) of a video, cached per file version."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _TIMESTAMPS:
        stamps, first = [None], None
        try:
            with _open_video(path) as container:  # one pass: every packet's timestamp, the first frame
                stream = container.streams.video[0]
                frame, stamps = _first_frame(container, stream, count_all=True)
                first = None if frame is None else frame.pts
        except Exception:  # noqa: BLE001 - a broken file: count frames while decoding instead
            pass
        table = None if any(p is None for p in stamps) or len(set(stamps)) != len(stamps) else tuple(sorted(stamps))
        lead = 0
        if table is not None:
            lead = _lead(table, first)
            table = table[lead:]
        if len(_TIMESTAMPS) > 256:
            _TIMESTAMPS.clear()
        _TIMESTAMPS[key] = (table, lead)
    return _TIMESTAMPS[key]


def read_video_pair(path, a: int, b: int):
    """Frames ``a`` < ``b`` of a video as PIL RGB images (as a player shows them:
    ``displayed_image``), and the index of B actually read.

    Frame i is the i-th frame of the stream in presentation order, whatever the timing
    (variable frame rate included): indices come from the table of the packets' timestamps
    (``frame_timestamps``). Seeks to the keyframe at or before ``a`` and decodes forward to
    ``b``: the cost is a GOP plus the gap. Without timestamps (or when a seek cannot be
    trusted) it decodes from the start and counts frames. If the video ends (or breaks)
    before ``b`` although its metadata promised more frames, B is the last frame decoded
    after ``a``; if no frame after ``a`` decodes, PairReadError.
    """
    table = frame_timestamps(path)
    read = _read_after_seek(path, a, b, table) if a > 0 and table is not None and a < len(table) else None
    if read is None:  # not seekable, no timestamps, or the seek overshot: decode from the start
        with _open_video(path) as container:
            stream = container.streams.video[0]
            (frame_a, _), (frame_b, b_read) = _decode_span(container.decode(stream), a, b, None, after_seek=False)
            read = displayed_image(frame_a, stream), displayed_image(frame_b, stream), b_read
    return read


def _read_after_seek(path, a: int, b: int, table: tuple):
    """(image A, image B, b') read after seeking to the keyframe before ``a``, or None if that fails."""
    with _open_video(path) as container:
        stream = container.streams.video[0]
        try:
            container.seek(table[a], stream=stream, backward=True, any_frame=False)
        except Exception:  # noqa: BLE001 - some containers cannot seek; decode from the start
            return None
        span = _decode_span(container.decode(stream), a, b, {pts: i for i, pts in enumerate(table)},
                            after_seek=True)
        if span is None:
            return None
        (frame_a, _), (frame_b, b_read) = span
        return displayed_image(frame_a, stream), displayed_image(frame_b, stream), b_read


def _decode_span(decoded, a: int, b: int, lookup: dict | None, after_seek: bool):
    """Decode forward to ((frame A, a'), (frame B, b')), a' the first index >= a and b' the
    first >= b; a frame's index is its timestamp's place in ``lookup`` or, without one (from
    the start only), its position. Returns None after a seek that cannot be trusted (it
    landed after ``a``, or a frame's timestamp is unknown). A decode error or the end of the
    stream after A gives B = the last good frame after A."""
    found_a, last = None, None
    try:
        for position, frame in enumerate(decoded):
            index = position if lookup is None else lookup.get(frame.pts)
            if index is None:
                if after_seek:
                    return None
                index = position
            if found_a is None:
                if after_seek and position == 0 and index > a:
                    return None
                if index >= a:
                    found_a = (frame, index)
                continue
            last = (frame, index)
            if index >= b:
                return found_a, last
    except Exception:  # noqa: BLE001 - a broken tail: keep what decoded (checked below)
        pass
    if found_a is None or last is None:
        raise PairReadError(f"the video ends or breaks before frame {a if found_a is None else a + 1}")
    return found_a, last


def video_frames(path):
    """Every frame of a video, decoded from the start, as ``H x W x 3`` uint8 RGB arrays as a
    player shows them (``displayed_image``: rotation and sample aspect ratio applied); frame i
    is the i-th in presentation order, whatever the timing (variable frame rate included),
    as in ``read_video_pair``. A decode error after the first frame ends the video there
    with a ``SkippedFileWarning``; a file with no video stream or no decodable frame raises
    ``UserError``."""
    import numpy as np

    from fmapicon.errors import UserError

    path = Path(path)
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty (0 bytes): give a video file or a folder of frames")
    count = 0
    try:
        with _open_video(path) as container:
            if not container.streams.video:
                raise UserError(f"{path} has no video stream: give a video file or a folder of frames")
            stream = container.streams.video[0]
            for frame in container.decode(stream):
                count += 1
                yield np.asarray(displayed_image(frame, stream))
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - PyAV raises many types for broken files
        if not count:
            raise UserError(f"cannot read the video {path} ({type(error).__name__}: {error}): give a video "
                            "that a player opens, or a folder of frames") from error
        warnings.warn(f"{path}: the video breaks after frame {count - 1} ({error}); using the frames before",
                      SkippedFileWarning, stacklevel=2)
    if not count:
        raise UserError(f"no frame of {path} decodes: give a video that a player opens, or a folder of frames")


def video_rate(path) -> float | None:
    """The video's average frame rate (frames per second), or None when it states none or
    cannot be opened (``video_frames`` then says why)."""
    return _stream_value(path, lambda stream: float(stream.average_rate) if stream.average_rate else None)


def stated_frames(path) -> int | None:
    """The frame count the video's container states (a progress hint: frames that do not
    decode are in it), or None when it states none or cannot be opened."""
    return _stream_value(path, lambda stream: int(stream.frames) if stream.frames and stream.frames > 0 else None)


def _stream_value(path, read):
    try:
        with _open_video(path) as container:
            return read(container.streams.video[0]) if container.streams.video else None
    except Exception:  # noqa: BLE001 - PyAV raises many types for broken files
        return None


def frame_files(folder) -> list[Path]:
    """The image files directly in ``folder`` in natural order (``natural_sorted``), by the
    one listing rule (``fmapicon.paths.visible_files``: hidden and companion files left out)."""
    return natural_sorted(visible_files(folder, IMAGE_EXTENSIONS))
