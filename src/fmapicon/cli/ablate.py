"""``fmapicon ablate``: the writeup's attempts 0-3 in one command; the work is ``fmapicon.experiments.ablate``."""

from __future__ import annotations

import argparse
import os

from fmapicon.cli._types import (device_name, existing_folder, non_negative_int, positive_float, positive_int,
                                  training_source)

DESCRIPTION = """Reproduce the writeup's story: train attempt 0 (no augmentation), 1 (affine), 2 (affine +
PixelCenter) and 3 (roll + affine + PixelCenter, the writeup's final version) with the same data, network, seed and
budget, then compare them: log_p and log_p_shuffled on held-out pairs (eval mode, each attempt's own
augmentation; equal values mean a positional code), J&F of label propagation and EPE on held-out
synthetic scenes. Writes DIR/ablation.csv, DIR/ablation.md, the curves and PCA feature pictures, and
DIR/report.html. The defaults take under an hour on 2 CPU cores; --quick a few minutes."""


def _attempt_list(text: str) -> list:
    """``0,1,2,3`` -> the names; ``none`` -> [] (only the --extra configurations run)."""
    if text.strip().lower() == "none":
        return []
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected attempts such as 0,1,2,3 (or none), got {text!r}")
    return names


def _extra(text: str) -> str:
    name, sep, _ = text.partition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME:key=value,..., e.g. roll-only:aug=roll,center=false; "
                                         f"got {text!r}")
    return text


def register(subparsers) -> None:
    parser = subparsers.add_parser("ablate", help="the writeup's attempts 0-3: train each, compare log_p, J&F, EPE",
                                   description=DESCRIPTION)
    parser.add_argument("--out", metavar="DIR", default="runs/ablate",
                        help="output folder; an existing non-empty one needs --force (default: %(default)s)")
    parser.add_argument("--attempts", type=_attempt_list, default=["0", "1", "2", "3"],
                        help="comma-separated attempts to run: 0 none, 1 affine, 2 affine + PixelCenter, "
                        "3 roll+affine + PixelCenter; none: only the --extra ones (default: 0,1,2,3)")
    parser.add_argument("--extra", metavar="NAME:K=V,...", type=_extra, action="append", default=[],
                        help="add a configuration of your own, with keys of fmapicon train, e.g. "
                        "roll-only:aug=roll,center=false (repeatable; default: none)")
    parser.add_argument("--data", metavar="PATH", nargs="+", type=training_source, default=[],
                        help="training videos / frame folders, as fmapicon train --data (default: synthetic scenes)")
    parser.add_argument("--minutes", type=positive_float, default=None,
                        help="wall-clock cap of EACH attempt; --steps usually ends it first "
                        "(default: 10, or 20 with --quick)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="step budget of each attempt, the same on any machine; training stops at whichever "
                        "of --minutes and --steps comes first (default: 300, as the demo; 150 with --quick)")
    parser.add_argument("--davis", metavar="ROOT", type=existing_folder, default=None,
                        help="also score DAVIS J&F of every attempt on this folder (default: none)")
    parser.add_argument("--davis-set", metavar="SET", default=None,
                        help="the DAVIS sequence list (default: val, or the folder's only list)")
    parser.add_argument("--quick", action="store_true", default=False,
                        help="24 x 24 training, 150 steps per attempt, tiny evaluation: a few minutes (default: off)")
    parser.add_argument("--force", action="store_true", default=False,
                        help="replace the outputs of an earlier ablation in --out once the new ones are complete; a "
                        "failed or interrupted run leaves them as they were (default: refuse)")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="auto (CUDA when available), cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="the seed shared by every attempt (weights, data order, scenes) (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                        help="no progress bars (default: show them on stderr)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from fmapicon.experiments.ablate import CSV_COLUMNS, AblationConfig, run_ablation
    from fmapicon.bench import format_table

    config = AblationConfig(out=args.out, attempts=list(args.attempts), extra=list(args.extra), data=list(args.data),
                            minutes=args.minutes, steps=args.steps, davis=args.davis, davis_set=args.davis_set,
                            quick=args.quick, force=args.force, device=args.device, seed=args.seed,
                            progress=args.progress)
    rows = run_ablation(config, say=lambda text: print(text, flush=True))
    columns = CSV_COLUMNS + (["davis_jf_mean"] if args.davis else [])
    print(format_table(rows, columns))
    print(f"wrote {os.path.join(args.out, 'ablation.csv')}, ablation.md and report.html")
    return 0
