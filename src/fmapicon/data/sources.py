"""Training pairs of frames from videos, folders of frames, and synthetic scenes.

A sample is two frames (A, B) of one clip, B coming ``gap`` frames after A with ``gap``
uniform in 1..max_gap (clipped to the clip's length), each cropped to a square and
resized to ``size`` x ``size``: ``3 x S x S`` float32 in [0, 1], channels in **RGB**
order (the original code read frames with OpenCV, so its channels were BGR).

Sources (any mix, one path or a list):

- video files (.mp4 .avi .mkv .webm .mov .m4v), decoded with PyAV: seek to the keyframe
  at or before A, decode forward to A and on to B, never the whole video;
- a folder whose files are images (.jpg .jpeg .png .ppm .bmp .webp .tif .tiff): one
  clip, frames in natural order (frame2 before frame10);
- a folder of such folders and/or videos, scanned recursively; a folder that holds
  ``JPEGImages`` is read as a DAVIS root: only ``JPEGImages/480p`` (or ``JPEGImages``)
  is used, so annotations, flows and videos beside it are not mistaken for clips;
- ``"synth"``: procedural scenes (``fmapicon.data.synth``) rendered on the fly, with the
  options ``synth:scenes=64,frames=40,size=R,objects=3,seed=1``; R (the render size)
  defaults to 4/3 of ``size`` so that each frame is downsampled like real video; the
  default seed 1 keeps them apart from ``fmapicon synth``'s default seed 0 (held-out sets).

Bad files (zero bytes, not a video, truncated, unreadable image, fewer than 2 frames) are
skipped with one warning each and counted in ``.summary``; a source with no usable
clip raises UserError. Frame counts are cached in a JSON index keyed by absolute path,
size and modification time (``$FMAPICON_CACHE`` or ``~/.cache/fmapicon``), so that a
large folder starts quickly the second time.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fmapicon.errors import UserError

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v"})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp", ".tif", ".tiff"})
INDEX_FILE = "frame_index.json"
INDEX_VERSION = 1
MAX_ATTEMPTS = 32
SYNTH_DEFAULTS = {"scenes": 64, "frames": 40, "size": None, "objects": 3, "seed": 1}


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
class Pair:
    """A loaded sample and where it came from (``index_b`` may be earlier than drawn when
    the end of a video does not decode; ``attempts`` counts redraws after failures)."""

    a: torch.Tensor
    b: torch.Tensor
    clip: str
    index_a: int
    index_b: int
    attempts: int


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
        message = f"skipping {path}: {reason.replace('_', ' ')}" + (f" ({detail})" if detail else "")
        warnings.warn(message, SkippedFileWarning, stacklevel=4)


# ---------------------------------------------------------------------------------------
# the dataset


class FramePairs(torch.utils.data.Dataset):
    """Pairs of frames ``(A, B)``, each ``3 x size x size`` float32 in [0, 1], RGB.

    Parameters
    ----------
    sources : a path, ``"synth[:options]"``, or a list of them (see the module docstring).
    size : S, the side of the square training frames (original: 120).
    max_gap : B is 1..max_gap frames after A, uniform, clipped to the clip (original: 30).
    crop : ``"center"`` (the original: the largest centred square, resized to S) or
        ``"random"`` (a square covering a fraction in ``crop_scale`` of the short side,
        at a random place); A and B always share the crop.
    seed : the pairs are a function of (seed, epoch, index) only, so DataLoader workers
        and distributed ranks (each with its own indices) draw reproducibly.
    length : ``len(dataset)``; default the number of frames that can start a pair.
    cache_dir : where the frame-count index lives; default ``$FMAPICON_CACHE`` or
        ``~/.cache/fmapicon``; ``False`` disables it.
    weighting : ``"frames"`` draws clips in proportion to their length (every frame equally
        likely), ``"clips"`` draws every clip equally often (the original's choice).

    Attributes
    ----------
    scale : training pixels per source pixel of the centre crop, S / short side (DAVIS
        480p at S=120: 0.25); the median when clips differ. A random crop covering a
        fraction f of the short side has scale ``scale / f``.
    input_scale : the scale at which evaluation should show frames to a model trained on
        these pairs (recorded as the run's ``input_scale``): ``scale`` for centre crops;
        for random crops ``scale / sqrt(low * high)`` of ``crop_scale = (low, high)``, the
        geometric middle of the scales seen in training (0.07-0.1 of 480p at S=32: 0.80,
        where ``scale`` alone would say 0.067, twelve times too small).
    summary : dict of clips, frames, clips by kind, skipped files by reason, decode
        failures and end-of-video fallbacks (in this process).
    """

    def __init__(self, sources, size: int = 120, max_gap: int = 30, crop: str = "center", seed: int = 0,
                 length: int | None = None, cache_dir=None, crop_scale: tuple[float, float] = (0.5, 1.0),
                 weighting: str = "frames"):
        _check_options(size, max_gap, crop, crop_scale, weighting, length, seed)
        self.size, self.max_gap, self.crop, self.seed = int(size), int(max_gap), crop, int(seed)
        self.crop_scale, self.weighting = tuple(crop_scale), weighting
        self.epoch = 0
        self._report = ScanReport()
        index = FrameIndex(_cache_path(cache_dir))
        self.clips: list[Clip] = []
        self._synth: dict[str, dict] = {}
        for source in _as_list(sources):
            self.clips += self._scan_source(source, index)
        index.save()
        weights = np.array([c.frames - 1 if weighting == "frames" else 1 for c in self.clips], dtype=np.float64)
        self._cumulative = np.cumsum(weights) / weights.sum()
        self.length = int(length) if length is not None else int(sum(c.frames - 1 for c in self.clips))
        self.scale = float(np.median([self.size / min(c.width, c.height) for c in self.clips]))
        low, high = self.crop_scale
        self.input_scale = self.scale / math.sqrt(low * high) if crop == "random" else self.scale
        self._counters = Counter()
        self._warned: set[str] = set()
        self._models: dict = {}  # synth scene models, built lazily in each process

    # -- sources ---------------------------------------------------------------------------

    def _scan_source(self, source, index) -> list[Clip]:
        if isinstance(source, str) and (source == "synth" or source.startswith("synth:")):
            options = parse_synth(source, self.size)
            self._synth[source] = options
            return [Clip("synth", f"{source}#{k}", options["frames"], options["size"], options["size"], scene=k)
                    for k in range(options["scenes"])]
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(f"data source {source!s} does not exist: give video files, folders of frames or 'synth'")
        before = dict(self._report.skipped)
        found = _scan_path(path.resolve(), index, self._report)
        if not found:
            raise UserError(_nothing_usable(path, self._report, before))
        return found

    # -- sampling ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Draw different pairs in each epoch (call before creating the DataLoader iterator)."""
        self.epoch = int(epoch)

    def _draw(self, index: int, attempt: int):
        """(clip number, a, b, crop box) for ``index``: a function of (seed, epoch, index, attempt)."""
        rng = np.random.default_rng([self.seed, self.epoch, int(index), attempt])
        clip_number = int(np.searchsorted(self._cumulative, rng.uniform(), side="right"))
        clip_number = min(clip_number, len(self.clips) - 1)
        clip = self.clips[clip_number]
        gap = min(int(rng.integers(1, self.max_gap + 1)), clip.frames - 1)
        a = int(rng.integers(0, clip.frames - gap))
        return clip_number, a, a + gap, self._crop_box(rng, clip.width, clip.height)

    def _crop_box(self, rng, width: int, height: int) -> tuple[float, float, float, float]:
        """The crop as fractions (x0, y0, x1, y1) of the frame, so that it fits any frame size."""
        side = min(width, height)
        if self.crop == "random":
            side *= rng.uniform(*self.crop_scale)
        x0 = rng.uniform(0, width - side) if self.crop == "random" else (width - side) / 2
        y0 = rng.uniform(0, height - side) if self.crop == "random" else (height - side) / 2
        return x0 / width, y0 / height, (x0 + side) / width, (y0 + side) / height

    def first_frames(self, count: int) -> torch.Tensor:
        """Frame A of ``count`` pairs spread evenly over the dataset, drawn as in epoch 0:
        ``count x 3 x S x S``, a fixed sample of what training sees (fewer when the dataset
        is smaller). Used to calibrate PixelCenter (``networks.calibrate_pixel_center``)."""
        epoch = self.epoch
        self.set_epoch(0)
        try:
            step = max(1, len(self) // count)
            return torch.stack([self[i][0] for i in range(0, len(self), step)][:count])
        finally:
            self.set_epoch(epoch)

    def pair_indices(self, index: int) -> tuple[str, int, int]:
        """(clip path, frame index of A, frame index of B) drawn for ``index``, before any
        fallback (``load`` reports what was actually read)."""
        clip_number, a, b, _ = self._draw(index, 0)
        return self.clips[clip_number].path, a, b

    def __getitem__(self, index: int):
        pair = self.load(index)
        return pair.a, pair.b

    def load(self, index: int) -> Pair:
        """The pair for ``index``; a pair that does not decode is redrawn (deterministically)."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} pairs")
        last_error = None
        for attempt in range(MAX_ATTEMPTS):
            clip_number, a, b, box = self._draw(index, attempt)
            clip = self.clips[clip_number]
            try:
                image_a, image_b, b = self._read(clip, a, b)
            except Exception as error:  # noqa: BLE001 - one bad pair must never end a run
                self._failed(clip, a, b, error)
                last_error = error
                continue
            return Pair(self._to_tensor(image_a, box), self._to_tensor(image_b, box), clip.path, a, b, attempt)
        raise UserError(f"{MAX_ATTEMPTS} pairs in a row failed to decode (last: {clip.path}: "
                        f"{type(last_error).__name__}: {last_error}); the data looks mostly unreadable: "
                        "check the files or remove the broken ones")

    def _failed(self, clip: Clip, a: int, b: int, error: Exception) -> None:
        self._counters["decode_failures"] += 1
        if clip.path not in self._warned:
            self._warned.add(clip.path)
            warnings.warn(f"cannot decode frames {a} and {b} of {clip.path} ({type(error).__name__}: {error}); "
                          "drawing another pair", SkippedFileWarning, stacklevel=3)

    # -- reading -------------------------------------------------------------------------------

    def _read(self, clip: Clip, a: int, b: int):
        """Two PIL images (frame a, frame b) and the index of B actually read."""
        if clip.kind == "video":
            image_a, image_b, b_read = read_video_pair(clip.path, a, b)
            if b_read != b:
                self._counters["fallbacks"] += 1
            return image_a, image_b, b_read
        if clip.kind == "frames":
            folder = Path(clip.path)
            return self._open_image(folder / clip.files[a], clip), self._open_image(folder / clip.files[b], clip), b
        model = self._scene_model(clip)
        return Image.fromarray(model.render(a)[0]), Image.fromarray(model.render(b)[0]), b

    def _open_image(self, path: Path, clip: Clip) -> Image.Image:
        image = Image.open(path)
        # JPEG can decode at 1/2, 1/4, 1/8 size directly: ask for just enough pixels
        shrink = self.size / (min(clip.width, clip.height) * self.crop_scale[0] if self.crop == "random"
                              else min(clip.width, clip.height))
        if shrink < 0.5:
            image.draft("RGB", (math.ceil(clip.width * shrink), math.ceil(clip.height * shrink)))
        return image.convert("RGB")

    def _scene_model(self, clip: Clip):
        from fmapicon.data.synth import build_scene

        key = clip.path
        if key not in self._models:
            options = self._synth[clip.path.rsplit("#", 1)[0]]
            seed = synth_scene_seed(options["seed"], clip.scene)
            self._models[key] = build_scene(seed, options["frames"], (options["size"],) * 2, options["objects"])
        return self._models[key]

    def _to_tensor(self, image: Image.Image, box) -> torch.Tensor:
        """Crop the relative ``box`` and resize to S x S (antialiased bilinear) -> 3 x S x S in [0, 1]."""
        width, height = image.size
        pixels = (box[0] * width, box[1] * height, box[2] * width, box[3] * height)
        resized = image.resize((self.size, self.size), Image.BILINEAR, box=pixels)
        # numpy, not torch ops: tiny tensor ops in many workers contend for torch's thread pool
        array = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
        return torch.from_numpy(np.ascontiguousarray(array))

    # -- reporting -----------------------------------------------------------------------------

    @property
    def summary(self) -> dict:
        scales = [self.size / min(c.width, c.height) for c in self.clips]
        return {
            "clips": len(self.clips),
            "frames": int(sum(c.frames for c in self.clips)),
            "by_kind": dict(Counter(c.kind for c in self.clips)),
            "skipped": dict(self._report.skipped),
            "skipped_files": list(self._report.skipped_files),
            "other_files": self._report.other_files,
            "index": {"hits": self._report.index_hits, "misses": self._report.index_misses},
            "scale": {"median": self.scale, "min": min(scales), "max": max(scales), "input_scale": self.input_scale},
            "decode_failures": self._counters["decode_failures"],
            "fallbacks": self._counters["fallbacks"],
        }

    def __getstate__(self):
        # scene models are rebuilt lazily in each worker rather than pickled to it
        state = dict(self.__dict__)
        state["_models"] = {}
        return state


# ---------------------------------------------------------------------------------------
# options


def _as_list(sources) -> list:
    if isinstance(sources, (str, os.PathLike)):
        return [sources]
    sources = list(sources)
    if not sources:
        raise UserError("no data sources given: pass video files, folders of frames or 'synth'")
    return sources


def _check_options(size, max_gap, crop, crop_scale, weighting, length, seed) -> None:
    if int(seed) < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed}")
    if int(size) < 8:
        raise UserError(f"size must be at least 8 pixels, got {size}")
    if int(max_gap) < 1:
        raise UserError(f"max_gap must be at least 1 frame, got {max_gap}")
    if crop not in ("center", "random"):
        raise UserError(f"crop must be 'center' or 'random', got {crop!r}")
    low, high = crop_scale
    if not 0 < low <= high <= 1:
        raise UserError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {crop_scale}")
    if weighting not in ("frames", "clips"):
        raise UserError(f"weighting must be 'frames' or 'clips', got {weighting!r}")
    if length is not None and int(length) < 1:
        raise UserError(f"length must be at least 1, got {length}")


def parse_synth(text: str, size: int) -> dict:
    """``synth`` or ``synth:scenes=64,frames=40,size=160,objects=3,seed=1`` -> options dict.

    The render size defaults to 4/3 of the training size (even, at least 32)."""
    options = dict(SYNTH_DEFAULTS)
    _, _, tail = text.partition(":")
    for item in filter(None, (part.strip() for part in tail.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in options:
            raise UserError(f"bad synth option {item!r} in {text!r}: expected key=value with keys "
                            f"{', '.join(options)}, e.g. synth:scenes=64,frames=40")
        try:
            options[key] = int(value)
        except ValueError as error:
            raise UserError(f"synth option {key} must be an integer, got {value!r}") from error
    if options["size"] is None:
        options["size"] = max(32, 2 * round(size * 2 / 3))
    if options["scenes"] < 1 or options["frames"] < 2 or options["size"] < 16 or options["objects"] < 0:
        raise UserError(f"synth options out of range in {text!r}: need scenes >= 1, frames >= 2, "
                        "size >= 16, objects >= 0")
    return options


def synth_scene_seed(seed: int, scene: int) -> int:
    """The scene seed of the synth source's scene number ``scene`` (as ``fmapicon synth``)."""
    from fmapicon.data.synth import scene_seed

    return scene_seed(seed, scene)


def _cache_path(cache_dir) -> Path | None:
    if cache_dir is False:
        return None
    if cache_dir is None:
        cache_dir = os.environ.get("FMAPICON_CACHE") or Path.home() / ".cache" / "fmapicon"
    return Path(cache_dir).expanduser() / INDEX_FILE


def _nothing_usable(path: Path, report: ScanReport, before: dict) -> str:
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


def _scan_path(path: Path, index: FrameIndex, report: ScanReport) -> list[Clip]:
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
        entries = sorted(os.scandir(folder), key=lambda e: natural_key(e.name))
    except OSError as error:
        report.skip(folder, "unreadable_folder", str(error))
        return []
    clips, images = [], []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        suffix = os.path.splitext(entry.name)[1].lower()
        if entry.is_dir():
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
    decoding the first frame to prove the file is a readable video."""
    if nbytes == 0:
        return {"kind": "video", "error": "zero_bytes", "detail": ""}
    try:
        with _open_video(path) as container:
            if not container.streams.video:
                return {"kind": "video", "error": "no_video_stream", "detail": "the file has no video stream"}
            stream = container.streams.video[0]
            count = int(stream.frames) if stream.frames and stream.frames > 0 else None
            first = next(iter(container.decode(stream)), None)
            if first is None:
                return {"kind": "video", "error": "unreadable_video", "detail": "no frame decodes"}
            width, height = displayed_image(first, stream).size
        if count is None:
            count = _count_packets(path)
    except Exception as error:  # noqa: BLE001 - PyAV raises many types for broken files
        return {"kind": "video", "error": "unreadable_video", "detail": f"{type(error).__name__}: {error}"}
    return {"kind": "video", "error": None, "frames": int(count), "width": width, "height": height}


def _count_packets(path: Path) -> int:
    """Count the video packets without decoding them (one frame each for video codecs)."""
    with _open_video(path) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


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
    the i-th smallest), from the packets (demuxed, not decoded), cached per file version;
    None when some packet carries no timestamp (then frames are counted while decoding)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _TIMESTAMPS:
        stamps = [None]
        try:
            with _open_video(path) as container:
                stream = container.streams.video[0]
                stamps = [packet.pts for packet in container.demux(stream) if packet.size]
        except Exception:  # noqa: BLE001 - a broken file: count frames while decoding instead
            pass
        table = None if any(p is None for p in stamps) or len(set(stamps)) != len(stamps) else tuple(sorted(stamps))
        if len(_TIMESTAMPS) > 256:
            _TIMESTAMPS.clear()
        _TIMESTAMPS[key] = table
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
