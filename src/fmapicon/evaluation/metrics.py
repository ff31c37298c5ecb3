"""J&F for semi-supervised video object segmentation, as the official davis2017-evaluation
toolkit computes it (davisvideochallenge/davis2017-evaluation), to the last decimal.

Per object k and frame t, with P the predicted mask (prediction id == k), G the true mask
(annotation id == k) and V the void pixels (only when ``exclude_void``):

    J = |P & G & ~V| / |(P | G) & ~V|, and J = 1 when the union is empty;

    F = 2 p r / (p + r): the boundaries B(P & ~V) and B(G & ~V) (``boundary_map``) are
    matched within a disk of radius d = ceil(0.008 * sqrt(H^2 + W^2)) pixels (``disk``):
    precision p = |B_P & dilate(B_G)| / |B_P|, recall r = |B_G & dilate(B_P)| / |B_G|;
    p = 1, r = 0 when B_P is empty and B_G is not; p = 0, r = 1 in the opposite case;
    p = r = 1 when both are empty; F = 0 when p + r = 0.

Objects are the ids 1..K with K the largest id of the first annotated frame (255, void,
counts as background there); the first and the last annotated frames are not scored.
Per object, over its n scored frames (``statistics``): Mean = nanmean, Recall = mean of
(value > 0.5), Decay = nanmean(first bin) - nanmean(last bin) with the bins
``v[ids[i]:ids[i+1]+1]``, ``ids = round(linspace(1, n, 5) + 1e-10) - 1``. The global row
averages these over all objects of all sequences, and J&F-Mean = (J-Mean + F-Mean) / 2.

Void: the toolkit builds its void mask from the already-binarized object masks
(``mask == 255`` on booleans), so in effect it never excludes void pixels: the annotation's
255 counts as background. ``exclude_void=False`` (the default) reproduces those numbers;
``exclude_void=True`` excludes the void pixels from J and F as the toolkit's code intends.

Deviations, none of which changes a number the toolkit produces: a prediction whose largest
id is below K (an object lost in every frame) is scored with empty masks, where the toolkit
stops; the decay bins use int64, where the toolkit's uint8 would wrap past 256 frames.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path

import numpy as np

from fmapicon.errors import UserError
from fmapicon.paths import display_path

BOUNDARY_TOLERANCE = 0.008
GLOBAL_COLUMNS = ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
SEQUENCE_COLUMNS = ["Sequence", "J-Mean", "F-Mean"]
VOID = 255


class SkippedSequenceWarning(UserWarning):
    """A sequence of the set that has nothing to score (one warning per sequence)."""


# --------------------------------------------------------------------------- per frame


def jaccard(prediction: np.ndarray, truth: np.ndarray, void: np.ndarray | None = None) -> float:
    """Region similarity J of two ``H x W`` boolean masks (1 when both are empty)."""
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"mask shapes differ: prediction {prediction.shape}, truth {truth.shape}")
    keep = np.ones_like(truth) if void is None else ~np.asarray(void, bool)
    union = np.count_nonzero((prediction | truth) & keep)
    if union == 0:
        return 1.0
    return np.count_nonzero(prediction & truth & keep) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary of an ``H x W`` mask (the toolkit's ``seg2bmap``).

    Pixel (y, x) is on the boundary when it differs from its right, lower or lower-right
    neighbour (outside the image counts as background); in the last row only the right
    neighbour counts, in the last column only the lower one, and the bottom-right corner
    never counts. The boundary so sits half a pixel towards the origin.
    """
    mask = np.asarray(mask, bool)
    right = np.zeros_like(mask)
    below = np.zeros_like(mask)
    diagonal = np.zeros_like(mask)
    right[:, :-1] = mask[:, 1:]
    below[:-1, :] = mask[1:, :]
    diagonal[:-1, :-1] = mask[1:, 1:]
    boundary = (mask ^ right) | (mask ^ below) | (mask ^ diagonal)
    boundary[-1, :] = mask[-1, :] ^ right[-1, :]
    boundary[:, -1] = mask[:, -1] ^ below[:, -1]
    boundary[-1, -1] = False
    return boundary


def disk(radius: float) -> np.ndarray:
    """The disk footprint ``(2r+1) x (2r+1)``: offsets (dy, dx) with dy^2 + dx^2 <= r^2.

    The same array as ``skimage.morphology.disk(r)``, which the toolkit dilates with.
    """
    offsets = np.arange(-radius, radius + 1)
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
    return dy**2 + dx**2 <= radius**2


def boundary_tolerance(shape, bound_th: float = BOUNDARY_TOLERANCE) -> float:
    """The matching radius in pixels: ``bound_th`` itself when >= 1, else
    ``ceil(bound_th * sqrt(H^2 + W^2))``."""
    return bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*shape[:2]))


def dilate(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Binary dilation of ``mask`` by a disk-shaped ``footprint`` (zero outside the image).

    Equal to ``scipy.ndimage.binary_dilation(mask, structure=footprint)`` (and to the
    toolkit's ``cv2.dilate``) for any footprint whose rows are centred runs of ones, as a
    disk's are, and for any mask shape (also smaller than the footprint), but 4x faster: row dy of the footprint, ``[-w, w]``, is a 1-D maximum filter
    of width 2w + 1 along x, shifted by dy; the output is the union over the rows.
    """
    from scipy.ndimage import maximum_filter1d

    radius = footprint.shape[0] // 2
    half_widths = footprint.sum(axis=1) // 2
    height = mask.shape[0]
    out = np.zeros(mask.shape, dtype=bool)
    widened = {}
    for dy, w in zip(range(-radius, radius + 1), half_widths):
        if abs(dy) >= height:  # this row of the footprint reaches past the whole frame
            continue
        if w not in widened:
            widened[w] = maximum_filter1d(mask.view(np.uint8), size=2 * w + 1, axis=1, mode="constant") > 0
        if dy >= 0:
            out[dy:] |= widened[w][: height - dy]
        else:
            out[:dy] |= widened[w][-dy:]
    return out


def _matched(boundary: np.ndarray, other: np.ndarray, footprint: np.ndarray) -> int:
    """Pixels of ``boundary`` within the footprint of a pixel of ``other``.

    The dilation runs on the bounding box of both maps only: every pixel that dilating
    ``other`` can reach and that we look at lies inside it, so the count is exact.
    """
    rows = np.flatnonzero(np.any(boundary | other, axis=1))
    cols = np.flatnonzero(np.any(boundary | other, axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    reach = dilate(np.ascontiguousarray(other[box]), footprint)
    return int(np.count_nonzero(boundary[box] & reach))


def f_measure(prediction: np.ndarray, truth: np.ndarray, void: np.ndarray | None = None,
              bound_th: float = BOUNDARY_TOLERANCE) -> float:
    """Boundary F-measure of two ``H x W`` boolean masks (see the module docstring)."""
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    if prediction.shape != truth.shape:
        raise ValueError(f"mask shapes differ: prediction {prediction.shape}, truth {truth.shape}")
    if void is not None:
        keep = ~np.asarray(void, bool)
        prediction, truth = prediction & keep, truth & keep
    predicted_boundary, true_boundary = boundary_map(prediction), boundary_map(truth)
    n_predicted, n_true = np.count_nonzero(predicted_boundary), np.count_nonzero(true_boundary)
    if n_predicted == 0 or n_true == 0:
        # the toolkit's conventions: nothing to match on one side
        precision = 1.0 if n_predicted == 0 else 0.0
        recall = 1.0 if n_true == 0 else 0.0
    else:
        footprint = disk(boundary_tolerance(truth.shape, bound_th))
        precision = _matched(predicted_boundary, true_boundary, footprint) / n_predicted
        recall = _matched(true_boundary, predicted_boundary, footprint) / n_true
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------- per object


def decay_bins(n: int) -> np.ndarray:
    """The toolkit's 5 bin edges over n frames: ``round(linspace(1, n, 5) + 1e-10) - 1``.

    The 1e-10 makes halves round up (numpy rounds them to even). Bin i is
    ``values[ids[i] : ids[i+1] + 1]``; consecutive bins share their edge frame.
    """
    return (np.round(np.linspace(1, n, 5) + 1e-10) - 1).astype(np.int64)


def statistics(values) -> tuple[float, float, float]:
    """(Mean, Recall, Decay) of one object's per-frame J or F values (the toolkit's
    ``db_statistics``); all nan when there are no frames."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return math.nan, math.nan, math.nan
    ids = decay_bins(values.size)
    bins = [values[ids[i]: ids[i + 1] + 1] for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-nan bins give nan
        mean = float(np.nanmean(values))
        decay = float(np.nanmean(bins[0]) - np.nanmean(bins[3]))
    recall = float(np.mean(values > 0.5))
    return mean, recall, decay


# --------------------------------------------------------------------------- per sequence


def object_count(first_annotation: np.ndarray) -> int:
    """K: the largest object id of the first annotated frame, void (255) counted as 0."""
    ids = np.asarray(first_annotation)
    return int(np.max(np.where(ids == VOID, 0, ids), initial=0))


def score_frame(truth_ids: np.ndarray, predicted_ids: np.ndarray, objects: int,
                exclude_void: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """J and F (arrays of length K) of one frame for objects 1..K, from ``H x W`` id maps."""
    void = truth_ids == VOID if exclude_void else None
    j_values, f_values = np.zeros(objects), np.zeros(objects)
    for k in range(1, objects + 1):
        truth, prediction = truth_ids == k, predicted_ids == k
        j_values[k - 1] = jaccard(prediction, truth, void)
        f_values[k - 1] = f_measure(prediction, truth, void)
    return j_values, f_values


def _read_prediction(path: Path, truth_path: Path, shape, objects: int, style=None) -> np.ndarray:
    """The prediction's ids, checked: the file exists, has the annotation's size, ids <= K.

    RGB predictions use the colours of the sequence's annotations (``style``)."""
    from fmapicon.data.davis import AnnotationStyle, read_annotation

    if not path.is_file():
        raise UserError(f"missing prediction {display_path(path)}: expected one indexed PNG per annotated frame "
                        f"(named as the annotation), in the DAVIS palette")
    ids = read_annotation(path, AnnotationStyle(colours=style.colours) if style is not None else None)
    if ids.shape != tuple(shape):
        raise UserError(f"prediction {path} is {ids.shape[1]} x {ids.shape[0]} (W x H) but its "
                        f"annotation {truth_path} is {shape[1]} x {shape[0]}: write predictions at the "
                        "frame's size")
    highest = int(ids.max(initial=0))
    if highest > objects:
        raise UserError(f"prediction {path} holds object id {highest} but the first annotated frame "
                        f"has {objects} object(s) (ids 1..{objects}): use the first frame's ids")
    return ids


def score_sequence(annotation_files, prediction_dir, exclude_void: bool = False) -> dict:
    """Per-frame J and F of one sequence: ``{"objects": K, "frames": [names], "J": K x n,
    "F": K x n}`` over the annotated frames except the first and the last (n = 0 for a
    sequence of fewer than 3 annotated frames: nothing to score).

    The annotations are read with one style for the whole sequence
    (``fmapicon.data.davis.read_annotations``). Raises UserError when an annotation's size differs
    from the first one's (naming the ground-truth file) or a prediction is missing or wrong.
    """
    from fmapicon.data.davis import read_annotations

    annotation_files = [Path(p) for p in annotation_files]
    truths, style = read_annotations(annotation_files)
    objects = object_count(truths[0])
    scored = annotation_files[1:-1]
    j_values, f_values = np.zeros((objects, len(scored))), np.zeros((objects, len(scored)))
    for t, truth_path in enumerate(scored):
        truth = truths[t + 1]
        if truth.shape != truths[0].shape:
            raise UserError(f"ground-truth mask {truth_path} is {truth.shape[1]} x {truth.shape[0]} (W x H) but "
                            f"{annotation_files[0].name} of the same sequence is {truths[0].shape[1]} x "
                            f"{truths[0].shape[0]}: every annotation of a sequence must have the frames' size")
        prediction = _read_prediction(Path(prediction_dir) / truth_path.name, truth_path, truth.shape, objects, style)
        j_values[:, t], f_values[:, t] = score_frame(truth, prediction, objects, exclude_void)
    return {"objects": objects, "frames": [p.stem for p in scored], "J": j_values, "F": f_values}


# --------------------------------------------------------------------------- a DAVIS set


def _object_rows(name: str, scores: dict) -> list[dict]:
    rows = []
    for k in range(scores["objects"]):
        j_stats, f_stats = statistics(scores["J"][k]), statistics(scores["F"][k])
        row = {"Sequence": f"{name}_{k + 1}"}
        row.update(zip(("J-Mean", "J-Recall", "J-Decay"), j_stats))
        row.update(zip(("F-Mean", "F-Recall", "F-Decay"), f_stats))
        rows.append(row)
    return rows


def global_results(objects: list[dict]) -> dict:
    """The global row: each statistic averaged over all objects (np.mean, as the toolkit)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # no objects -> nan
        row = {c: float(np.mean([o[c] for o in objects])) for c in GLOBAL_COLUMNS[1:]}
    return {"J&F-Mean": (row["J-Mean"] + row["F-Mean"]) / 2, **row}


def score_davis(davis_root, results_dir, set_name: str | None = "val", sequences=None,
                exclude_void: bool = False, progress: bool = True) -> dict:
    """Score predictions ``results_dir/<seq>/<frame>.png`` against a DAVIS root.

    Parameters
    ----------
    davis_root : folder with ``Annotations/480p/<seq>/`` (2016 or 2017 style) and ``ImageSets``
    results_dir : folder with one sub-folder of indexed PNGs per sequence
    set_name : the sequence list ``ImageSets/2017/<set>.txt`` or ``ImageSets/<set>.txt``;
        None: ``fmapicon.data.davis.resolve_set``'s choice (val, or the root's only list), as eval
    sequences : names (list or "a,b,c") instead of the set's list
    exclude_void : exclude void (255) pixels from J and F (the toolkit, in effect, does not)

    Sequences with nothing to score (fewer than 3 annotated frames, or no object in the first
    annotated frame) are skipped with one ``SkippedSequenceWarning`` each and listed under
    ``"skipped"``; when nothing at all is left, UserError (never an empty or NaN result).

    Returns
    -------
    ``{"set", "sequences" (the scored ones), "skipped", "exclude_void", "global": {column:
    value}, "objects": [rows], "per_frame": {"<seq>_<k>": {"frames", "J", "F"}}, "jf_mean"}``
    """
    from tqdm import tqdm

    from fmapicon.data.davis import annotation_paths, layout, resolve_set, sequence_names

    _, annotations_dir = layout(davis_root)
    set_name = resolve_set(davis_root, set_name)
    names = sequence_names(davis_root, set_name, sequences)
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise UserError(f"results folder {display_path(results_dir)} does not exist: expected <seq>/<frame>.png "
                        "predictions")
    objects, per_frame, skipped = [], {}, []
    for name in tqdm(names, desc="score", unit="seq", disable=not progress, leave=False):
        scores = score_sequence(annotation_paths(annotations_dir, name), results_dir / name, exclude_void)
        if not scores["frames"] or not scores["objects"]:
            why = (f"{len(scores['frames']) + 2 if scores['frames'] else 'fewer than 3'} annotated frame(s): the first "
                   "and the last are not scored" if not scores["frames"] else "no object in its first annotated frame")
            warnings.warn(f"sequence {name!r} skipped: nothing to score ({why})", SkippedSequenceWarning, stacklevel=2)
            skipped.append(name)
            continue
        objects += _object_rows(name, scores)
        for k in range(scores["objects"]):
            per_frame[f"{name}_{k + 1}"] = {"frames": scores["frames"], "J": scores["J"][k].tolist(),
                                            "F": scores["F"][k].tolist()}
    if not objects:
        raise UserError(f"nothing to score in {davis_root} (set {set_name!r}): every selected sequence "
                        f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) has fewer than 3 annotated "
                        "frames or no object in its first annotated frame (the first and last annotated frames "
                        "are never scored)")
    overall = global_results(objects)
    return {"set": set_name, "sequences": [n for n in names if n not in skipped], "skipped": skipped,
            "exclude_void": exclude_void, "global": overall, "objects": objects, "per_frame": per_frame,
            "jf_mean": overall["J&F-Mean"]}


# --------------------------------------------------------------------------- output


def _cell(value) -> str:
    """Numbers with three decimals (pandas' float_format="%.3f"), nan as an empty cell."""
    if isinstance(value, str):
        return value
    return "" if value is None or math.isnan(value) else f"{value:.3f}"


def _csv_text(columns: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row[c]) for c in columns])
    return buffer.getvalue()


def write_results(results: dict, out_dir, set_name: str | None = None) -> tuple[Path, Path]:
    """Write ``global_results-<set>.csv`` and ``per-sequence_results-<set>.csv`` (the
    toolkit's files: same columns, three decimals) atomically; return their paths. UTF-8,
    sequence names that are not UTF-8 as their bytes on disk (``fmapicon.paths``)."""
    from fmapicon.runtime import atomic_write

    set_name = set_name or results["set"]
    out_dir = Path(out_dir)
    paths = (out_dir / f"global_results-{set_name}.csv", out_dir / f"per-sequence_results-{set_name}.csv")
    texts = (_csv_text(GLOBAL_COLUMNS, [results["global"]]), _csv_text(SEQUENCE_COLUMNS, results["objects"]))
    for path, text in zip(paths, texts):
        with atomic_write(path, "w") as handle:  # a name's non-UTF-8 bytes are written back as they were
            handle.write(text)
    return paths


def _text_table(columns: list[str], rows: list[dict]) -> str:
    from fmapicon.paths import display_path

    cells = [[display_path(_cell(row[c])) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = [" ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += [" ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def format_results(results: dict) -> str:
    """The toolkit's printout: the global table, then J-Mean and F-Mean per object."""
    set_name = results["set"]
    return "\n".join([
        f"--------------------------- Global results for {set_name} ---------------------------",
        _text_table(GLOBAL_COLUMNS, [results["global"]]),
        "",
        f"---------- Per sequence results for {set_name} ----------",
        _text_table(SEQUENCE_COLUMNS, results["objects"]),
    ])
