"""Label propagation through a video: the protocol of CRW (ajabri/videowalk), streaming.

The DAVIS harness (``evaluate_davis``) is ``fmapicon.evaluation.davis_eval``; tracking
your own video, ``fmapicon.evaluation.track``.

CRW protocol (``protocol="crw"``), every value a field of ``PropagationParams``:

1. Features. The network sees each frame resized by ``input_scale``; its features are
   resampled (bilinearly, anti-aliased when shrinking) to cells of about ``stride`` pixels
   that tile the full-size frame, ``h x w = stride_grid(H, W, stride)`` = ``max(1,
   round(H / stride)) x max(1, round(W / stride))``, and L2-normalized.
2. Labels. The first frame's ids 0..K (void 255 counts as background) become one-hot maps,
   bilinearly down-sampled to ``h x w`` (align_corners=False, no anti-aliasing: OpenCV's
   INTER_LINEAR, as CRW).
3. Context of frame t >= 1: the first frame (the long-term memory, with its true labels)
   plus the ``context`` frames t-n .. t-1 with their soft predicted labels, where indices
   below 0 repeat the first frame (CRW pads the video with n copies of it, true labels and
   all, so the early frames see duplicates).
4. Affinity of a query cell q of frame t with a key cell k of a context frame:
   ``<f_q, f_k> / temperature``. Keys of the short-term frames count only within
   ``|q - k| < radius`` feature cells (Euclidean, on the grid); the first frame's keys count
   everywhere (CRW leaves its long-term memory unrestricted; ``restrict_first=True`` applies
   the radius there too). With ``pixels_weight`` w > 0 the affinity fuses the model's
   cosine with the ``pixels`` baseline's (Lab colour patches on the same cells, at scale 1):
   ``((1 - w) <f_q, f_k> + w <p_q, p_k>) / temperature`` (``fuse_features``). The ``topk``
   largest affinities over all context keys together are kept and softmax-normalized; the
   query's soft label is their weighted sum of the keys' soft labels. It becomes frame t's
   context label for later frames.
5. Output: the soft labels bilinearly up-sampled to H x W (align_corners=False), argmax.

Streaming (``LabelStream``): frames' features arrive one at a time. The affinities do not
depend on the labels, so each key frame s is met once, by the ``context`` query frames
whose context holds it (one batched product per tile), as soon as they have arrived; each
query frame keeps its k best candidates so far (``RunningTopK``), whose k-th best prunes the
key frames met after, and frame t is finished once its last context frame, t - 1, was met.
A frame's features are dropped once it was met as a key and finished as a query: at most
the first frame and ``context + 1`` others are held, whatever the video's length; labels
are kept for the first frame and the last ``context`` frames. Frame t's labels come out
``context - 1`` frames after its features went in (at the end, all at once). The tiled
affinities and their pruning (speed only, never the result, ties aside) are
``fmapicon.evaluation.local_affinity``.

``protocol="original"`` is the original FeatureMapICON code's evaluation
(``fmapicon.evaluation.original_protocol``); ``protocol="copy"`` repeats the first mask.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from fmapicon.errors import UserError
from fmapicon.evaluation.local_affinity import (FrameSearch, NearFloor, RunningTopK, Tiles, bf16_copy,
                                               bf16_is_faster, first_frame_topk, int8_is_faster, rounding_margin,
                                               scatter_rows, window_candidates)

PROTOCOLS = ("crw", "original", "copy")
VOID = 255
NEAR_RADIUS = 4.0        # the recent frames' keys that give each query a floor early
NEAR_FRAMES = 8
# coarse bounds first, float32 products where they pass (frame 0's ``FrameSearch``; where bf16
# products are native, the windows' too), from this many channels: below, a float32 product is
# cheaper than the entries it would rescore
COARSE_MIN_CHANNELS = 64
NO_QUERY_FLOOR = 2.0     # the floor of the tiles' padding cells: above any cosine, no candidates


@dataclass
class PropagationParams:
    """The protocol's values (defaults: CRW's DAVIS settings).

    protocol : ``crw``, ``original`` or ``copy``
    input_scale : the frame scale the network sees; None means the model's default
        (the scale a checkpoint was trained at, 1.0 for the baselines)
    stride : feature cell size in full-size pixels
    context : number of previous frames in the context (besides the first frame)
    radius : spatial radius of the short-term affinities, in feature cells (strict <)
    topk : affinities kept per query, over all context keys
    temperature : softmax temperature on the cosine affinities
    pixels_weight : w in [0, 1), the share of the ``pixels`` baseline's cosine in the
        affinity, ``(1 - w) cos(model) + w cos(pixels)``; 0: the model alone; None (default):
        the model's own, ``FeatureModel.default_pixels_weight`` (what its weights file records
        as validated, else 0; ``with_model_defaults``)
    restrict_first : apply the radius to the first frame's keys too (CRW does not)
    tile : query tile side in cells (memory and speed only, never the result)
    batch_size : frames per batch in feature extraction
    """

    protocol: str = "crw"
    input_scale: float | None = None
    stride: int = 8
    context: int = 20
    radius: float = 12.0
    topk: int = 10
    temperature: float = 0.05
    pixels_weight: float | None = None
    restrict_first: bool = False
    tile: int = 4
    batch_size: int = 4

    def checked(self) -> PropagationParams:
        problems = []
        if self.protocol not in PROTOCOLS:
            problems.append(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if self.input_scale is not None and not (0 < self.input_scale <= 8):
            problems.append(f"input_scale must be in (0, 8], got {self.input_scale}")
        for name in ("stride", "context", "topk", "tile", "batch_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.radius > 0:
            problems.append(f"radius must be > 0 feature cells, got {self.radius}")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if self.pixels_weight is None:
            pass
        elif not 0 <= self.pixels_weight < 1:
            problems.append(f"pixels_weight must be in [0, 1), got {self.pixels_weight} (1 would be the pixels "
                            "baseline alone: use --model pixels)")
        elif self.pixels_weight > 0 and self.protocol != "crw":
            problems.append(f"pixels_weight fuses affinities of the crw protocol, not of {self.protocol!r}")
        if problems:
            raise UserError("bad propagation parameters: " + "; ".join(problems))
        return self

    def with_model_defaults(self, model) -> PropagationParams:
        """These values with ``pixels_weight`` None replaced by the model's default (0 for a
        model without one, and for the protocols other than crw)."""
        if self.pixels_weight is not None:
            return self
        weight = getattr(model, "default_pixels_weight", 0.0) if self.protocol == "crw" else 0.0
        return dataclasses.replace(self, pixels_weight=float(weight))


# --------------------------------------------------------------------------- features and labels


class FrameFeatures:
    """The protocol's features of frames: ``__call__(frames)`` maps uint8 ``B x H x W x 3``
    to ``B x C x h x w`` unit features on ``stride_grid(H, W, stride)`` (the model's device),
    through ``fmapicon.evaluation.features.extract`` at ``input_scale`` (None: the model's
    default), fused with the ``pixels`` baseline's when ``pixels_weight`` > 0.
    ``seconds`` accumulates the time spent."""

    def __init__(self, model, params: PropagationParams):
        params = params.with_model_defaults(model)
        self.model, self.params = model, params
        self.input_scale = params.input_scale or model.default_input_scale
        self.colour = None
        if params.pixels_weight > 0:
            from fmapicon.evaluation.features import pixels_model

            self.colour = pixels_model(params.stride).to(model.device)
        self.seconds = 0.0

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        from fmapicon.data.images import to_tensor
        from fmapicon.evaluation.features import extract, fuse_features

        start = time.perf_counter()
        images = to_tensor(frames, self.model.device)
        features = extract(self.model, images, scale=self.input_scale, stride=self.params.stride)
        if self.colour is not None:
            colour = extract(self.colour, images, scale=1.0, stride=self.params.stride)
            features = fuse_features(features, colour, self.params.pixels_weight)
        self.seconds += time.perf_counter() - start
        return features


def soft_labels(ids: np.ndarray, grid, device="cpu", classes: int | None = None) -> torch.Tensor:
    """One-hot of ids 0..K (void 255 -> 0), bilinearly down-sampled to ``grid``:
    ``(K+1) x h x w``, or ``classes x h x w`` when given (at least K+1)."""
    ids = torch.from_numpy(np.where(ids == VOID, 0, ids).astype(np.int64)).to(device)
    onehot = F.one_hot(ids, classes or int(ids.max()) + 1).permute(2, 0, 1)[None].float()
    return F.interpolate(onehot, size=tuple(grid), mode="bilinear", align_corners=False)[0]


def labels_to_ids(labels: torch.Tensor, size) -> np.ndarray:
    """Soft labels ``(K+1) x h x w`` -> ``H x W`` uint8 ids: bilinear up-sampling, argmax."""
    full = F.interpolate(labels[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    # the argmax one map at a time (strict >: the first of equal maxima, as argmax): over the
    # first (strided) axis torch's argmax is ~30x slower on CPU, after a channels-last copy 2-4x
    best, ids = full[0].clone(), torch.zeros(full.shape[1:], dtype=torch.uint8, device=full.device)
    for k in range(1, len(full)):
        ids.masked_fill_(full[k] > best, k)
        torch.maximum(best, full[k], out=best)
    return ids.cpu().numpy()


def context_slots(t: int, context: int, restarts=()) -> list[int]:
    """The short-term context frames of frame t: t-n .. t-1, below 0 repeating frame 0, or,
    after a restart frame r < t (the latest), below r repeating r."""
    start = max([0, *(r for r in restarts if r < t)])
    return [max(start, t - context + j) for j in range(context)]


def _key_users(s: int, context: int, restarts=()) -> list[tuple[int, int]]:
    """``(t, copies)`` for every query frame t whose short-term context holds key frame s,
    ``copies`` times (frame 0, or a restart frame, fills the early contexts several times)."""
    users = [(t, context_slots(t, context, restarts).count(s)) for t in range(s + 1, s + context + 1)]
    return [(t, copies) for t, copies in users if copies]


# --------------------------------------------------------------------------- streaming CRW


class LabelStream:
    """CRW label propagation over frames that arrive one at a time (see the module docstring).

    Parameters
    ----------
    first_features : ``C x h x w`` unit features of frame 0
    first_labels : ``K x h x w`` soft labels of frame 0
    params : the protocol (context, radius, topk, temperature, restrict_first, tile)
    amend : optional ``amend(t, labels) -> labels``, called on each propagated frame's
        ``K x h x w`` labels before they enter the context of later frames (to add
        objects or points that start at frame t)
    restarts : frames r >= 1 that start the short-term context afresh, as frame 0 does: the
        frames after r see r in place of the frames before it (``context_slots``), so that
        what ``amend`` adds at r (an object the earlier frames called background) is not
        outvoted by them; frame 0 stays the long-term memory

    ``push(features)`` adds the next frame's ``C x h x w`` features and returns the
    ``(t, labels)`` of the frames finished by it (``K x h x w``, in order); ``close()``
    finishes the rest. ``retained`` is the number of frames whose features are held now,
    ``peak_retained`` the most so far (at most ``context + 2``).
    """

    def __init__(self, first_features: torch.Tensor, first_labels: torch.Tensor, params: PropagationParams,
                 amend: Callable | None = None, restarts=()):
        self.params = params.checked()
        self.n, self.amend = int(params.context), amend
        self.restarts = sorted({int(r) for r in restarts} - {0})
        if self.restarts and self.restarts[0] < 0:
            raise ValueError(f"restart frames must be >= 1, got {self.restarts[0]}")
        channels = first_features.shape[0]
        self.tiles = Tiles(first_features.shape[-2:], params.radius, params.tile, first_features.device,
                           first_features.dtype)
        self.near = NearFloor(self.tiles, min(NEAR_RADIUS, params.radius), min(NEAR_FRAMES, self.n))
        self.margin = rounding_margin(channels, first_features.dtype)
        self.first_keys = first_features.reshape(channels, -1).t().contiguous()     # hw x C
        # the coarse search of frame 0 pays for its float32 rescoring from about 64 channels on,
        # on CPU (a GPU's full product is cheap next to the search's many small steps)
        self.first_search = None
        if (channels >= COARSE_MIN_CHANNELS and first_features.dtype == torch.float32
                and first_features.device.type == "cpu" and not params.restrict_first):
            device = first_features.device
            coarse = "int8" if int8_is_faster(device) else "bf16" if bf16_is_faster(device) else "low-rank"
            self.first_search = FrameSearch(self.first_keys, first_features.shape[-2], coarse)
        tiles = self.tiles
        self.first_padded = tiles.pad_keys(first_features[None])[0]
        self.store = first_features.new_zeros((self.n + 1) * tiles.plane, first_labels.shape[0])
        self._store(0, first_labels)
        capacity = 2 * (self.n + 1)
        self.queries = first_features.new_zeros(tiles.rows, tiles.cols, capacity, tiles.tile**2, channels)
        # per query frame not finished: its k best candidates so far (frame 0's, then the key
        # frames' as they are met: ``RunningTopK``) and the floor it starts with
        k = int(params.topk)
        self.best = (first_features.new_full((capacity, tiles.cells, k), -math.inf),
                     torch.zeros(capacity, tiles.cells, k, dtype=torch.long, device=first_features.device))
        self.floors = first_features.new_zeros(capacity, tiles.cells)
        self.base, self.count, self.met = 1, 1, -1
        self.keys = {0: self.first_padded}
        # where bf16 products are native, the windows' entries are found by a bf16 copy of the
        # queries and keys first (``window_candidates``'s coarse), rescored in float32
        # (``bf16_copy``: the queries' rounding norms held beside them, each key frame's largest)
        self.coarse = None
        if (channels >= COARSE_MIN_CHANNELS and first_features.dtype == torch.float32
                and bf16_is_faster(first_features.device)):
            low_keys, rounding = bf16_copy(self.first_padded, dim=0)
            self.coarse = (self.queries.to(torch.bfloat16), self.queries.new_zeros(self.queries.shape[:-1]),
                           {0: (low_keys, rounding.max())})
        self.near_keys = {0: NearFloor.key_map(self.first_padded)}   # the near floor's key frames
        self.motion = {0: (0, 0)}       # recent frames' global motion since frame 0, cells (dy, dx)
        self.peak_retained = self.retained

    @property
    def retained(self) -> int:
        """Frames whose features are held: frame 0, the key frames not yet met, the query
        frames not yet finished."""
        return len({0, *self.keys, *range(self.met + 2, self.count)})

    def _slot(self, frame: int) -> int:
        return 0 if frame == 0 else 1 + (frame - 1) % self.n

    def _store(self, frame: int, labels: torch.Tensor) -> None:
        plane, slot = self.tiles.plane, self._slot(frame)
        padded = self.tiles.pad_keys(labels[None])[0]
        self.store[slot * plane:(slot + 1) * plane] = padded.permute(1, 2, 0).reshape(plane, -1)

    @torch.no_grad()
    def push(self, features: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        t = self.count
        if t - self.base == self.queries.shape[2]:
            keep = self.met + 2                                # the first query frame not finished
            for held in (self.queries,) + (self.coarse[:2] if self.coarse else ()):
                held[:, :, : t - keep] = held[:, :, keep - self.base: t - self.base].clone()
            for held in (*self.best, self.floors):
                held[: t - keep] = held[keep - self.base: t - self.base].clone()
            self.base = keep
        query = self.tiles.arrange(features[None])[:, :, 0]
        self.queries[:, :, t - self.base] = query
        self.keys[t] = self.tiles.pad_keys(features[None])[0]
        if self.coarse:
            self.coarse[0][:, :, t - self.base], self.coarse[1][:, :, t - self.base] = bf16_copy(query)
            low_keys, rounding = bf16_copy(self.keys[t], dim=0)
            self.coarse[2][t] = (low_keys, rounding.max())
        self.near_keys[t] = NearFloor.key_map(self.keys[t])
        self._seed(t, query)
        self.count += 1
        self.peak_retained = max(self.peak_retained, self.retained)
        finished = []
        while self.met + 1 + self.n <= t:
            finished.append(self._advance())
        return finished

    @torch.no_grad()
    def close(self) -> list[tuple[int, torch.Tensor]]:
        finished = []
        while self.met + 2 < self.count:
            finished.append(self._advance())
        return finished

    def _seed(self, t: int, queries: torch.Tensor) -> None:
        """Frame 0's candidates of query frame t (``rows x cols x Q x C``; all its cells, or
        with ``restrict_first`` within the radius), its first k best, and its floor."""
        k, tiles = self.params.topk, self.tiles
        floor = self._near_floor(t, queries)
        if self.params.restrict_first:
            _, query, values, index = window_candidates(tiles, queries[:, :, None], self.first_padded, k)
            values, index = scatter_rows(query, values, index, tiles.cells, k)
        else:
            flat = queries.reshape(-1, queries.shape[-1])
            if self.first_search is not None and bool(torch.isfinite(floor).all()):
                values, cells = self.first_search.above(flat, floor, k)
            else:
                values, cells = first_frame_topk(flat, self.first_keys, k, tiles.w)
            index = tiles.grid_index[cells]
        full = values.shape[-1] == k
        kth = values.amin(dim=-1) if full else values.new_full(values.shape[:1], -math.inf)
        best_values, best_index = (held[t - self.base] for held in self.best)
        best_values.fill_(-math.inf)[:, : values.shape[-1]] = values
        best_index.zero_()[:, : index.shape[-1]] = index
        self.floors[t - self.base] = torch.maximum(kth, floor)

    def seed_floor(self, t: int) -> torch.Tensor:
        """``Nq``: the floor query frame t (arrived, not finished) started with, before any
        key frame was met (tile order)."""
        return self.floors[t - self.base]

    def _near_frames(self, t: int) -> list[int]:
        """The last ``NEAR_FRAMES`` frames of t's short-term context (all held)."""
        return sorted(set(context_slots(t, self.n, self.restarts)[-min(NEAR_FRAMES, self.n):]))

    def _near_floor(self, t: int, queries: torch.Tensor) -> torch.Tensor:
        """``NearFloor``'s floor over the ``NEAR_FRAMES`` frames before t (held, in t's
        context within the radius: many close matches, so far above frame 0's k-th best),
        lowered by the rounding margin: the full products find those keys again, never below
        it. The windows move by the motion guessed for t (the latest frame's velocity, kept
        up); the motion measured there is t's. The tiles' padding cells (no query) get
        ``NO_QUERY_FLOOR``, so that no product's entries (frame 0's or the windows') are kept
        for them. The key maps and motions no later query frame needs are dropped."""
        frames, motion = self._near_frames(t), self.motion
        latest = frames[-1]
        velocity = [a - b for a, b in zip(motion[latest], motion.get(latest - 1, motion[latest]))]
        guess = [a + v * (t - latest) for a, v in zip(motion[latest], velocity)]
        shifts = [self.near.clamp([a - b for a, b in zip(guess, motion[s])]) for s in frames]
        floor, moved = self.near.floor(queries, [(s, self.near_keys[s], d) for s, d in zip(frames, shifts)],
                                       self.params.topk)
        motion[t] = tuple(a + b for a, b in zip(motion[latest], moved))
        later = self._near_frames(t + 1)
        for s in set(motion) - {t - 1, t, *later}:
            del motion[s]
        for s in set(self.near_keys) - set(later):
            del self.near_keys[s]
        return (floor - self.margin).masked_fill_(~self.tiles.on_grid, NO_QUERY_FLOOR)

    def _advance(self) -> tuple[int, torch.Tensor]:
        """Meet key frame s = met + 1 with its query frames, finish frame s + 1."""
        s = self.met + 1
        users = [(t, copies) for t, copies in _key_users(s, self.n, self.restarts) if t < self.count]
        first, last = users[0][0], users[-1][0]
        held = slice(first - self.base, last + 1 - self.base)
        coarse = None
        if self.coarse:
            coarse = (self.coarse[0][:, :, held], self.coarse[1][:, :, held], *self.coarse[2][s])
        running = RunningTopK(self.best[0][held], self.best[1][held], [copies for _, copies in users],
                              self._slot(s) * self.tiles.plane)
        window_candidates(self.tiles, self.queries[:, :, held], self.keys[s], self.params.topk, self.floors[held],
                          coarse, running)
        if s > 0:
            del self.keys[s]
            if self.coarse:
                del self.coarse[2][s]
        self.met = s
        t = s + 1
        labels = self._finish(t)
        if self.amend is not None:
            labels = self.amend(t, labels)
        self._store(t, labels)
        return t, labels

    def _finish(self, t: int) -> torch.Tensor:
        """Soft labels ``K x h x w`` of frame t, all its key frames met: softmax over its k best
        candidates' affinity / temperature, weighting their labels."""
        values, index = (held[t - self.base] for held in self.best)
        weights = torch.softmax(values / self.params.temperature, dim=-1)
        weights.masked_fill_(~self.tiles.on_grid[:, None], 0.0)       # padding cells: no candidates, no labels
        return self.tiles.to_grid((weights[..., None] * self.store[index]).sum(dim=1))


def propagate_labels(features, first_labels: torch.Tensor, params: PropagationParams, on_frame=None,
                     amend=None, restarts=()) -> Iterator[torch.Tensor]:
    """CRW label propagation on feature maps; yields the soft labels of every frame in order.

    Parameters
    ----------
    features : ``T x C x h x w`` unit features, or an iterable of ``C x h x w`` maps (consumed
        as the labels are yielded: see ``LabelStream``)
    first_labels : ``(K+1) x h x w`` soft labels of frame 0
    params : the protocol (context, radius, topk, temperature, restrict_first, tile)
    on_frame : called after each propagated frame
    amend, restarts : see ``LabelStream``

    Yields ``(K+1) x h x w`` soft labels of frames 0, 1, ... (frame 0's are ``first_labels``).
    The result equals the dense computation (top-k of the masked full affinities), ties aside.
    """
    frames = iter(features)
    stream = LabelStream(next(frames), first_labels, params, amend, restarts)
    yield first_labels
    for finished in (*(stream.push(f) for f in frames), stream.close()):
        for _, labels in finished:
            if on_frame is not None:
                on_frame()
            yield labels


def propagate_frames(model, frames: Iterable[np.ndarray], annotate: Callable, params: PropagationParams,
                     timings: dict | None = None, restarts=()) -> Iterator[tuple[int, np.ndarray, torch.Tensor]]:
    """Streaming CRW propagation over video frames; yields ``(t, frame, labels)`` in order.

    Parameters
    ----------
    model : a ``FeatureModel`` (``fmapicon.evaluation.features``)
    frames : uint8 ``H x W x 3`` frames, read as needed (``batch_size`` at a time for features)
    annotate : ``annotate(t, labels, grid) -> labels``: for t = 0 (``labels`` None) the first
        frame's ``K x h x w`` soft labels on ``grid`` = ``(h, w)``; for t >= 1 the labels to
        keep for frame t (``labels`` itself, or amended)
    timings : a dict where ``features_s`` and ``propagation_s`` (seconds) accumulate, and
        ``peak_retained`` (frames whose features or images were held at once) is kept
    restarts : frames that start the short-term context afresh (``LabelStream``), e.g. those
        where ``annotate`` adds objects

    Frames and features are held only while a later frame's context needs them: about
    ``context + batch_size`` frames at any time, whatever the video's length.
    """
    params = params.checked()
    timings = {} if timings is None else timings
    timings.update(features_s=timings.get("features_s", 0.0), propagation_s=timings.get("propagation_s", 0.0))
    features_of = FrameFeatures(model, params)
    held: deque = deque()                   # (t, frame) whose labels are not out yet
    stream, batch, size = None, [], None
    frames = iter(frames)
    while True:
        frame = next(frames, None)
        if frame is not None:
            frame = np.asarray(frame)
            if size is not None and frame.shape != size:
                raise UserError(f"frame {len(held) + (stream.count if stream else 0) + len(batch)} is "
                                f"{frame.shape[1]} x {frame.shape[0]}, the first {size[1]} x {size[0]}: "
                                "all frames of a video must have one size")
            size = frame.shape
            batch.append(frame)
        if batch and (frame is None or len(batch) == params.batch_size):
            before = features_of.seconds
            features = features_of(np.stack(batch))
            timings["features_s"] += features_of.seconds - before
            for image, feature in zip(batch, features):
                start = time.perf_counter()
                if stream is None:
                    first = annotate(0, None, feature.shape[-2:])
                    stream = LabelStream(feature, first, params, lambda t, labels: annotate(t, labels, None),
                                         restarts)
                    finished = [(0, first)]
                else:
                    finished = stream.push(feature)
                timings["propagation_s"] += time.perf_counter() - start
                held.append(image)
                timings["peak_retained"] = max(timings.get("peak_retained", 0), len(held) + stream.retained)
                yield from _release(held, finished)
            batch = []
        if frame is None:
            break
    if stream is not None:
        start = time.perf_counter()
        finished = stream.close()
        timings["propagation_s"] += time.perf_counter() - start
        yield from _release(held, finished)


def _release(held: deque, finished: list):
    for t, labels in finished:
        yield t, held.popleft(), labels


# --------------------------------------------------------------------------- whole sequences


def sequence_ids(model, frames: Iterable[np.ndarray], first_ids: np.ndarray, params: PropagationParams,
                 timings: dict | None = None, name: str = "sequence") -> Iterator[np.ndarray]:
    """Object ids of every frame of a sequence from the first frame's, frame by frame.

    Parameters
    ----------
    model : a ``FeatureModel``; ignored (may be None) for ``copy``
    frames : uint8 ``H x W x 3`` RGB frames, read as needed (the whole sequence at once
        only for ``protocol="original"``)
    first_ids : ``H x W`` ids of frame 0 (0 background, 1..K objects, 255 void -> 0)
    params : the protocol
    timings : a dict where ``features_s`` and ``propagation_s`` accumulate (seconds)

    Yields uint8 ``H x W`` ids of frames 0, 1, ... (frame 0's: ``first_ids``, void set to 0).
    Raises ``UserError`` when the first mask's size is not the frames'.
    """
    params = params.checked()
    timings = {} if timings is None else timings
    timings.update(features_s=timings.get("features_s", 0.0), propagation_s=timings.get("propagation_s", 0.0))
    first_ids = np.where(first_ids == VOID, 0, first_ids).astype(np.uint8)

    def check(frame):
        if first_ids.shape != frame.shape[:2]:
            raise UserError(f"{name}: the first mask is {first_ids.shape[1]} x {first_ids.shape[0]} pixels but "
                            f"the frames are {frame.shape[1]} x {frame.shape[0]}: give a mask of the frames' size")
        return frame

    frames = (check(np.asarray(frame)) for frame in frames)
    if params.protocol == "copy":
        yield from (first_ids for _ in frames)
        return
    if params.protocol == "original":
        from tqdm import tqdm

        from fmapicon.evaluation.original_protocol import propagate_original

        ids, timing = propagate_original(model, np.stack(list(frames)), first_ids, tqdm(disable=True))
        for key in ("features_s", "propagation_s"):
            timings[key] += timing[key]
        yield from ids
        return

    def annotate(t, labels, grid):
        return soft_labels(first_ids, grid, model.device) if t == 0 else labels

    for t, frame, labels in propagate_frames(model, frames, annotate, params, timings):
        start = time.perf_counter()
        ids = first_ids if t == 0 else labels_to_ids(labels, frame.shape[:2])
        timings["propagation_s"] += time.perf_counter() - start
        yield ids


def propagate_sequence(model, frames: np.ndarray, first_ids: np.ndarray, params: PropagationParams | None = None,
                       progress: bool = True, name: str = "") -> tuple[np.ndarray, dict]:
    """Object ids of every frame of a sequence held in memory (``sequence_ids``, collected).

    Parameters
    ----------
    model : a ``FeatureModel`` (``fmapicon.evaluation.features``); ignored (may be None) for ``copy``
    frames : uint8 ``T x H x W x 3`` RGB
    first_ids : ``H x W`` ids of frame 0 (0 background, 1..K objects, 255 void -> 0)
    params : the protocol; ``PropagationParams()`` when None
    progress : show a tqdm bar for this sequence
    name : the bar's label

    Returns
    -------
    ids : uint8 ``T x H x W`` (frame 0 is ``first_ids`` with void set to 0)
    timings : ``{"features_s", "propagation_s"}`` seconds
    """
    from tqdm import tqdm

    params = (params or PropagationParams()).checked()
    timings: dict = {}
    bar = tqdm(total=len(frames), desc=name or "propagate", unit="frame", leave=False, disable=not progress)
    ids = []
    try:
        with torch.no_grad():
            for frame_ids in sequence_ids(model, frames, first_ids, params, timings, name or "sequence"):
                ids.append(frame_ids)
                bar.update(1)
    finally:
        bar.close()
    return np.stack(ids), {"features_s": timings["features_s"], "propagation_s": timings["propagation_s"]}
