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

import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fmapicon.data.images import rgb_image, to_tensor
from fmapicon.data.sources import (Clip, FrameIndex, ScanReport, SkippedFileWarning, cache_path, nothing_usable,
                                   read_video_pair, scan_path)
from fmapicon.errors import UserError

MAX_ATTEMPTS = 32
SYNTH_DEFAULTS = {"scenes": 64, "frames": 40, "size": None, "objects": 3, "seed": 1}


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
                 length: int | None = None, cache_dir=None, crop_scale: tuple[float, float] = (0.5, 1.0)):
        _check_options(size, max_gap, crop, crop_scale, length, seed)
        self.size, self.max_gap, self.crop, self.seed = int(size), int(max_gap), crop, int(seed)
        self.crop_scale = tuple(crop_scale)
        self.epoch = 0
        self._report = ScanReport()
        index = FrameIndex(cache_path(cache_dir))
        self.clips: list[Clip] = []
        self._synth: dict[str, dict] = {}
        for source in _as_list(sources):
            self.clips += self._scan_source(source, index)
        index.save()
        weights = np.array([c.frames - 1 for c in self.clips], dtype=np.float64)  # every frame equally likely
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
        found = scan_path(path.resolve(), index, self._report)
        if not found:
            raise UserError(nothing_usable(path, self._report, before))
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
        return rgb_image(image)

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
        return to_tensor(np.asarray(resized))

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


def _check_options(size, max_gap, crop, crop_scale, length, seed) -> None:
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
