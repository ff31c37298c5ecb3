"""Keypoint propagation: points as labels, their sub-cell readout, PCK-T and the BADJA
benchmark.

A point (x, y) in pixels of an ``H x W`` frame (pixel centres at integers) lies at the
cell coordinates ``u = (x + 0.5) w / W - 0.5``, ``v = (y + 0.5) h / H - 0.5`` of the
``h x w`` feature grid (cell centres at integers: the grid of ``stride_grid`` tiles the
frame exactly). As a label it is that position bilinearly splatted onto the four cells
around it (mass 1; a position beyond the outer cell centres is clamped onto them), and
it propagates like an object's one-hot map (the CRW protocol of
``fmapicon.evaluation.propagate``; CRW, UVC and DINO report keypoint propagation this
way). Read back from a propagated map it is the label-weighted centroid of the 3 x 3
cells around the map's largest cell, so a splatted point reads back exactly; its score
is the map's mass in that window, clipped to [0, 1] (1 at the start, lower as the label
spreads or fades).

PCK-T (Harley et al., "Particle Video Revisited", ECCV 2022, on BADJA of Biggs et al.,
ACCV 2018): a predicted joint is correct when it lies within ``0.2 sqrt(A)`` pixels of the
truth, A the area in pixels of the object's mask in that frame; queries come from the
first annotated frame; every later annotated frame is scored, over the joints visible
there and in the query frame.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fmapicon.errors import UserError

PCK_FRACTION = 0.2
PCK_OUTPUTS = ("pck.json", "pck-per-sequence.csv")  # what evaluate_badja writes
BADJA_HEIGHT = 1080   # BADJA's joints are pixels of the 1920 x 1080 frames


def to_cells(xy: np.ndarray, size, grid) -> np.ndarray:
    """Pixel positions ``N x 2`` (x, y) of an ``H x W`` frame -> cell coordinates ``N x 2``
    (u, v) on the ``h x w`` grid (see the module docstring)."""
    (height, width), (h, w) = size, grid
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    return np.stack([(xy[:, 0] + 0.5) * w / width - 0.5, (xy[:, 1] + 0.5) * h / height - 0.5], axis=1)


def to_pixels(uv: np.ndarray, size, grid) -> np.ndarray:
    """The inverse of ``to_cells``: cell coordinates ``N x 2`` (u, v) -> pixels (x, y)."""
    (height, width), (h, w) = size, grid
    uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
    return np.stack([(uv[:, 0] + 0.5) * width / w - 0.5, (uv[:, 1] + 0.5) * height / h - 0.5], axis=1)


def point_labels(xy: np.ndarray, size, grid, device="cpu") -> torch.Tensor:
    """Points ``N x 2`` (x, y pixels) as labels ``N x h x w``: each bilinearly splatted onto
    the four cells around its cell position, mass 1."""
    h, w = grid
    uv = to_cells(xy, size, grid)
    u, v = np.clip(uv[:, 0], 0, w - 1), np.clip(uv[:, 1], 0, h - 1)
    labels = torch.zeros(len(uv), h, w, device=device)
    x0, y0 = np.minimum(np.floor(u).astype(int), max(w - 2, 0)), np.minimum(np.floor(v).astype(int), max(h - 2, 0))
    fx, fy = u - x0, v - y0
    for n in range(len(uv)):
        for dy, wy in ((0, 1 - fy[n]), (1, fy[n])):
            for dx, wx in ((0, 1 - fx[n]), (1, fx[n])):
                if wy * wx > 0:
                    labels[n, y0[n] + dy, x0[n] + dx] += float(wy * wx)
    return labels


def read_points(labels: torch.Tensor, size) -> tuple[np.ndarray, np.ndarray]:
    """Positions of propagated point labels ``N x h x w``: ``(xy, score)``, ``N x 2`` pixels
    (x, y) of the ``size = (H, W)`` frame and ``N`` scores in [0, 1] (see the module docstring)."""
    count, h, w = labels.shape
    maps = labels.clamp(min=0).detach().cpu().double()
    best = maps.reshape(count, -1).argmax(dim=1)
    top, left = (best // w).numpy(), (best % w).numpy()
    uv, score = np.zeros((count, 2)), np.zeros(count)
    for n in range(count):
        y0, y1, x0, x1 = max(top[n] - 1, 0), min(top[n] + 2, h), max(left[n] - 1, 0), min(left[n] + 2, w)
        window = maps[n, y0:y1, x0:x1].numpy()
        mass = window.sum()
        if mass <= 0:
            uv[n] = (left[n], top[n])
            continue
        ys, xs = np.mgrid[y0:y1, x0:x1]
        uv[n] = ((window * xs).sum() / mass, (window * ys).sum() / mass)
        score[n] = min(1.0, mass)
    return to_pixels(uv, size, (h, w)), score


def pck_t(predicted: np.ndarray, truth: np.ndarray, area: float, fraction: float = PCK_FRACTION) -> np.ndarray:
    """Correct joints: ``|predicted - truth| < fraction sqrt(area)`` per joint (``N x 2``
    pixels each, ``area`` the object's mask area in pixels); a bool ``N``."""
    distance = np.linalg.norm(np.asarray(predicted, float) - np.asarray(truth, float), axis=-1)
    return distance < fraction * np.sqrt(float(area))


# --------------------------------------------------------------------------- BADJA


@dataclass
class BadjaSequence:
    """One BADJA sequence on the 480p DAVIS frames.

    frames : names of its annotated frames (DAVIS frame stems), in order
    joints : ``F x J x 2`` (x, y) pixels of the 480p frames
    visible : ``F x J`` bool
    """

    name: str
    frames: list
    joints: np.ndarray
    visible: np.ndarray


def read_badja(path, height: int = 480) -> BadjaSequence:
    """A BADJA JSON file (a list of annotated frames with ``image_path``, ``joints`` (row,
    col) pixels of the 1920 x 1080 frame and ``visibility``), its joints scaled to frames of
    ``height`` pixels and turned to (x, y). Raises ``UserError`` naming the file when it is
    not one."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
        frames = [Path(e["image_path"]).stem for e in entries]
        joints = np.array([e["joints"] for e in entries], dtype=np.float64)[..., ::-1] * (height / BADJA_HEIGHT)
        visible = np.array([e["visibility"] for e in entries], dtype=bool)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise UserError(f"{path} is not a BADJA annotation file (a JSON list of frames with image_path, joints "
                        f"and visibility): {error}") from error
    if joints.ndim != 3 or joints.shape[-1] != 2 or visible.shape != joints.shape[:2] or not len(frames):
        raise UserError(f"{path}: joints must be frames x J x 2 with a visibility per joint, got {joints.shape}")
    order = np.argsort([int(f) if f.isdigit() else i for i, f in enumerate(frames)], kind="stable")
    return BadjaSequence(path.stem, [frames[i] for i in order], joints[order], visible[order])


def score_sequence(sequence: BadjaSequence, predicted: dict, areas: dict) -> dict:
    """PCK-T of one sequence: ``predicted[frame] -> J x 2`` pixels, ``areas[frame]`` the mask
    area in pixels; joints visible in the first annotated frame and in the scored one."""
    query = sequence.visible[0]
    correct = total = 0
    for f in range(1, len(sequence.frames)):
        joints = query & sequence.visible[f]
        name = sequence.frames[f]
        if not joints.any():
            continue
        hits = pck_t(predicted[name][joints], sequence.joints[f][joints], areas[name])
        correct, total = correct + int(hits.sum()), total + int(joints.sum())
    return {"pck_t": correct / total if total else None, "joints": total, "correct": correct,
            "tracked": int(query.sum()), "frames_scored": len(sequence.frames) - 1}


def _find_sequence(roots: list, name: str):
    from fmapicon.data.davis import layout

    for root in roots:
        images, annotations = layout(root)
        if (images / name).is_dir():
            return images / name, annotations / name
    return None


def evaluate_badja(model, badja_dir, davis_roots, out_dir, params=None, device="auto", progress: bool = True,
                   sequences=None) -> dict:
    """Keypoint propagation on BADJA, scored by PCK-T (see the module docstring).

    Parameters
    ----------
    model : a spec for ``fmapicon.evaluation.features.load_model`` or a ``FeatureModel``
    badja_dir : folder of BADJA JSON files, ``<sequence>.json``
    davis_roots : one DAVIS root or a list of them: the 480p frames and masks of the sequences
        (a sequence found in none is reported under ``missing``)
    out_dir : where ``pck.json`` (``pck_t_mean`` over sequences; per sequence its PCK-T, the
        joints scored, ...) and ``pck-per-sequence.csv`` are written, staged and published whole
        (``fmapicon.runtime.staged_output``, pck.json last)
    params : the ``PropagationParams`` (CRW)
    sequences : names of the sequences to score (None: every ``<sequence>.json`` in ``badja_dir``)

    Returns pck.json's record. Raises ``UserError`` when ``badja_dir`` holds no JSON file, or
    none for a sequence asked for.
    """
    import csv
    import dataclasses
    import io

    from fmapicon.data.davis import read_annotation
    from fmapicon.data.sources import frame_files
    from fmapicon.evaluation.features import load_model
    from fmapicon.evaluation.propagate import PropagationParams
    from fmapicon.evaluation.track import Points, track
    from fmapicon.runtime import atomic_write, resolve_device, staged_output, write_json

    params = (params or PropagationParams()).checked()
    files = sorted(Path(badja_dir).glob("*.json")) if Path(badja_dir).is_dir() else []
    if not files:
        raise UserError(f"no BADJA annotations (*.json) in {badja_dir}: give the folder of <sequence>.json files")
    if sequences is not None:
        held = {path.stem: path for path in files}
        unknown = [name for name in sequences if name not in held]
        if unknown:
            raise UserError(f"no BADJA annotation {unknown[0]}.json in {badja_dir} (it holds: {', '.join(held)}): "
                            "give sequences from that list with --sequences")
        files = [held[name] for name in sequences]
    roots = [davis_roots] if isinstance(davis_roots, (str, Path)) else list(davis_roots)
    if not hasattr(model, "default_input_scale"):
        model = load_model(model, resolve_device(device), stride=params.stride)
    params = params.with_model_defaults(model)  # the values used, as pck.json records them
    sequences, missing = {}, []
    for path in files:
        sequence = read_badja(path)
        found = _find_sequence(roots, sequence.name)
        if found is None:
            missing.append(sequence.name)
            continue
        images, annotations = found
        stems = [p.stem for p in frame_files(images)]
        absent = [f for f in sequence.frames if f not in stems]
        if absent:
            raise UserError(f"{path} annotates frame {absent[0]} that {images} does not hold: give the DAVIS root "
                            "of this sequence's 480p frames with --davis")
        query = np.flatnonzero(sequence.visible[0])
        start = stems.index(sequence.frames[0])
        points = Points(np.full(len(query), start), sequence.joints[0][query], [str(j) for j in query])
        wanted = {stems.index(f): f for f in sequence.frames[1:]}
        predicted = {}
        for result in track(images, points=points, model=model, **dataclasses.asdict(params)):
            if result.index in wanted:
                joints = np.full(sequence.joints.shape[1:], np.nan)
                joints[query] = result.points
                predicted[wanted[result.index]] = joints
        areas = {f: int((read_annotation(annotations / f"{f}.png") > 0).sum()) for f in sequence.frames[1:]}
        sequences[sequence.name] = score_sequence(sequence, predicted, areas)
        if progress:
            print(f"{sequence.name}: PCK-T {sequences[sequence.name]['pck_t']:.3f}", flush=True)
    scores = [s["pck_t"] for s in sequences.values() if s["pck_t"] is not None]
    record = {"pck_t_mean": float(np.mean(scores)) if scores else None, "sequences": sequences, "missing": missing,
              "model": getattr(model, "name", str(model)), "params": dataclasses.asdict(params),
              "threshold": f"{PCK_FRACTION} sqrt(mask area)", "badja": str(badja_dir), "davis": [str(r) for r in roots]}
    table = io.StringIO()
    rows = csv.writer(table)
    rows.writerow(["sequence", "pck_t", "joints", "correct", "tracked", "frames_scored"])
    for name, s in sequences.items():
        rows.writerow([name, "" if s["pck_t"] is None else f"{s['pck_t']:.4f}", s["joints"], s["correct"],
                       s["tracked"], s["frames_scored"]])
    with staged_output(out_dir, force=True, outputs=PCK_OUTPUTS, last=("pck.json",)) as staging:
        with atomic_write(staging / "pck-per-sequence.csv", "w") as handle:
            handle.write(table.getvalue())
        write_json(staging / "pck.json", record)
    return record
