"""The DAVIS harness of label propagation: propagate the first masks of every sequence of a
set (``fmapicon.evaluation.propagate.sequence_ids``, frames read one at a time), write the indexed PNGs, score
them (``fmapicon.evaluation.metrics.score_davis``) and record the protocol and timings in
``eval.json``. Everything is staged and published whole: a failed run leaves ``out_dir``
as it was.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from fmapicon.errors import UserError
from fmapicon.evaluation.propagate import PropagationParams
from fmapicon.runtime import staged_output


def _resolve_model(model, params: PropagationParams, device):
    """(FeatureModel or None for copy, its name, the device used).

    Without a device, a model object stays where it is (a network being trained must not
    be moved) and a spec loads on ``auto``.
    """
    from fmapicon.evaluation.features import FeatureModel, load_model
    from fmapicon.runtime import resolve_device

    if params.protocol == "copy" or (isinstance(model, str) and model == "copy"):
        return None, "copy", torch.device("cpu")
    if device is None and isinstance(model, FeatureModel):
        device = model.device
    elif device is None and isinstance(model, torch.nn.Module):
        device = next(iter(model.parameters())).device
    device = resolve_device(device or "auto") if isinstance(device, str) or device is None else device
    loaded = load_model(model, device, stride=params.stride)
    return loaded, loaded.name, device


def evaluate_davis(model, davis_root, out_dir, set_name: str | None = None, sequences=None,
                   params: PropagationParams | None = None, device=None, progress: bool = True,
                   exclude_void: bool = False) -> dict:
    """Propagate the first masks of a DAVIS set, write and score the predictions.

    Parameters
    ----------
    model : a spec for ``fmapicon.evaluation.features.load_model`` (run folder, checkpoint, ``pixels``,
        ``random``, ``xfeat``), ``copy``, a ``FeatureModel`` or an ``nn.Module``
    davis_root : folder with ``JPEGImages/480p``, ``Annotations/480p``, ``ImageSets``
    out_dir : where ``<seq>/<frame>.png`` (indexed, DAVIS palette), the two toolkit CSVs
        and ``eval.json`` (the protocol actually used, per-sequence timings) are written
    set_name, sequences : which sequences (see ``fmapicon.data.davis.sequence_names``)
    params : the protocol; ``copy`` as model implies ``protocol="copy"``
    device : where features and affinities are computed (default: a model object's own
        device, else ``auto``)

    Everything is written into a staging sibling of ``out_dir`` and published only when the
    whole evaluation succeeded (``fmapicon.runtime.staged_output``, ``eval.json`` last), so a
    failed or interrupted run leaves ``out_dir`` as it was; then the earlier evaluation's
    entries (``previous_outputs``) and entries of the same names are replaced, other files are
    kept (``fmapicon eval`` refuses a non-empty ``out_dir`` without ``--force``).

    Returns
    -------
    the score of ``fmapicon.evaluation.metrics.score_davis`` plus ``"timings"`` and ``"eval_json"``.
    """
    from fmapicon.data.davis import layout, resolve_set, sequence_names

    params = (params or PropagationParams()).checked()
    if isinstance(model, str) and model == "copy":
        params = dataclasses.replace(params, protocol="copy")
    layout(davis_root)
    set_name = resolve_set(davis_root, set_name)
    names = sequence_names(davis_root, set_name, sequences)
    feature_model, model_name, device = _resolve_model(model, params, device)
    params = params.with_model_defaults(feature_model)  # the values used, as eval.json records them
    out_dir = Path(out_dir)
    with staged_output(out_dir, force=True, outputs=previous_outputs, last=("eval.json",)) as staging:
        result = _evaluate_into(feature_model, model_name, device, davis_root, staging, set_name, names,
                                params, progress, exclude_void)
    return {**result, "eval_json": str(out_dir / "eval.json")}


def _evaluate_into(feature_model, model_name, device, davis_root, staging: Path, set_name, names,
                   params, progress, exclude_void) -> dict:
    """``evaluate_davis``'s work, written into ``staging`` (published by the caller)."""
    from fmapicon.evaluation.metrics import format_results, score_davis, write_results

    timings = _propagate_set(feature_model, davis_root, names, staging, params, progress)
    results = score_davis(davis_root, staging, set_name, names, exclude_void=exclude_void, progress=progress)
    write_results(results, staging, set_name)
    input_scale = None
    if feature_model is not None:
        input_scale = 0.25 if params.protocol == "original" else params.input_scale or feature_model.default_input_scale
    record = {
        "model": model_name, "protocol": params.protocol, "params": dataclasses.asdict(params),
        "input_scale": input_scale, "device": str(device), "davis": str(davis_root), "set": set_name,
        "sequences": results["sequences"], "skipped": results["skipped"], "exclude_void": exclude_void,
        "timings": timings, "totals": _totals(timings),
        "global": results["global"], "objects": results["objects"], "jf_mean": results["jf_mean"],
    }
    _write_record(record, staging)
    return {**results, "timings": timings, "totals": record["totals"],
            "table": format_results(results), "model": model_name, "input_scale": input_scale}


def _propagate_set(feature_model, davis_root, names, out_dir: Path, params, progress) -> dict:
    """Propagate and write every sequence's masks; return the timings per sequence.

    Propagation starts at the sequence's first annotated frame (the frame whose name is the
    first annotation's); the frames before it get all-background masks, as nothing is known
    there yet.
    """
    from fmapicon.data.davis import annotation_paths, annotation_style, frame_paths, layout, read_annotation
    from fmapicon.data.images import read_image
    from fmapicon.data.davis import write_indexed_png
    from fmapicon.evaluation.propagate import sequence_ids

    images_dir, annotations_dir = layout(davis_root)
    timings = {}
    for name in names:
        paths = frame_paths(images_dir, name)
        truths = annotation_paths(annotations_dir, name)
        stems = [p.stem for p in paths]
        _check_frames_cover(truths, stems, images_dir / name)
        start = stems.index(truths[0].stem)
        first_ids = read_annotation(truths[0], annotation_style(truths))
        timing: dict = {}
        size = _frame_size(paths[start:], name)
        frames = (_same_size(read_image(p), size, p) for p in paths[start:])
        bar = _progress(len(paths) - start, name, progress)
        try:
            for t, ids in enumerate(sequence_ids(feature_model, frames, first_ids, params, timing, name)):
                write_indexed_png(out_dir / name / f"{paths[start + t].stem}.png", ids)
                bar.update(1)
        finally:
            bar.close()
        blank = np.zeros(size, np.uint8)
        for path in paths[:start]:
            write_indexed_png(out_dir / name / f"{path.stem}.png", blank)
        timings[name] = {"frames": len(paths) - start, "first_annotated": start, "height": size[0],
                         "width": size[1], **timing}
    return timings


def _frame_size(paths, name) -> tuple[int, int]:
    """The size of a sequence's first frame (header only)."""
    from PIL import Image

    try:
        with Image.open(paths[0]) as image:
            return image.height, image.width
    except OSError as error:
        raise UserError(f"cannot read frame {paths[0]} of {name}: {error}") from error


def _same_size(frame: np.ndarray, size, path) -> np.ndarray:
    if frame.shape[:2] != tuple(size):
        raise UserError(f"frames of one sequence differ in size ({frame.shape[1]} x {frame.shape[0]} at {path}, "
                        f"{size[1]} x {size[0]} before)")
    return frame


def _progress(total: int, name: str, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="frame", leave=False, disable=not show)


def _check_frames_cover(truths: list[Path], stems: list[str], frames_dir: Path) -> None:
    """Refuse annotations without a frame of the same name: a prediction is written per frame,
    so such an annotation could never be scored (a sequence cut short, frames renamed)."""
    from fmapicon.paths import display_path

    lonely = [t for t in truths if t.stem not in set(stems)]
    if lonely:
        shown = ", ".join(display_path(t.name) for t in lonely[:3]) + (", ..." if len(lonely) > 3 else "")
        raise UserError(f"{len(lonely)} of {len(truths)} annotation(s) in {display_path(lonely[0].parent)} have no "
                        f"frame of the same name in {display_path(frames_dir)} ({len(stems)} frames, "
                        f"{display_path(stems[0])}..{display_path(stems[-1])}): {shown}; add the missing frames "
                        "or remove those annotations (frames and annotations are matched by name)")


def previous_outputs(out_dir: Path) -> list[str]:
    """Names of the entries an earlier ``evaluate_davis`` wrote into ``out_dir`` (from its
    eval.json: sequence folders, the toolkit CSVs, eval.json itself); [] when there is none."""
    import json

    record_path = Path(out_dir) / "eval.json"
    if not record_path.is_file():
        return []
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return ["eval.json"]
    names = list(record.get("sequences", [])) + list(record.get("skipped", []) or [])
    names += [p.name for p in Path(out_dir).glob("*_results-*.csv")]
    return names + ["eval.json"]


def _write_record(record: dict, out_dir: Path) -> Path:
    """``out_dir/eval.json``, atomically, stamped with the version and date."""
    from fmapicon import __version__
    from fmapicon.runtime import write_json

    record = {**record, "fmapicon": __version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return write_json(out_dir / "eval.json", record)


def _totals(timings: dict) -> dict:
    frames = sum(t["frames"] for t in timings.values())
    features = sum(t["features_s"] for t in timings.values())
    propagation = sum(t["propagation_s"] for t in timings.values())
    per_frame = (lambda s: s / frames if frames else None)
    return {"frames": frames, "features_s": features, "propagation_s": propagation,
            "features_s_per_frame": per_frame(features), "propagation_s_per_frame": per_frame(propagation)}
