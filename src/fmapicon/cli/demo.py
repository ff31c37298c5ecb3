"""``fmapicon demo``: the main job, from nothing to a report; the work is ``fmapicon.experiments.demo.run_demo``."""

from __future__ import annotations

import os

from fmapicon.cli._types import (device_name, existing_folder, non_negative_int, positive_float, positive_int,
                                  training_source)

DESCRIPTION = """Train FeatureMapICON features on synthetic scenes (or your --data) for a wall-clock budget,
then evaluate them, the shipped `reference` model and the copy, pixels and random baselines with the
same protocol: label
propagation (J&F) on held-out synthetic sequences (and a DAVIS folder with --davis), and
correspondence end-point error against exact flow (and FlyingChairs-style pairs with --pairs).
Writes DIR/run (the training run), DIR/results.json and DIR/report.html (one self-contained page).
Needs matplotlib for the pictures (pip install 'fmapicon[plots]')."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="the main job: train, evaluate against baselines, write a report",
                                   description=DESCRIPTION)
    parser.add_argument("--out", metavar="DIR", default="runs/demo",
                        help="output folder; an existing non-empty one needs --force (default: %(default)s)")
    parser.add_argument("--data", metavar="PATH", nargs="+", type=training_source, default=[],
                        help="train on these videos / frame folders instead of synthetic scenes; evaluation "
                        "still uses held-out synthetic scenes (default: synthetic scenes)")
    parser.add_argument("--minutes", type=positive_float, default=None,
                        help="wall-clock cap of training; --steps usually ends it first "
                        "(default: 10, or 1.5 with --quick)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="optimizer steps of training, whichever of --steps and --minutes ends first; on "
                        "synthetic scenes held-out J&F peaks after a few hundred steps while EPE keeps "
                        "improving (default: 300, about 3.5 minutes on 2 idle cores; 30 with --quick)")
    parser.add_argument("--davis", metavar="ROOT", type=existing_folder, default=None,
                        help="also evaluate J&F on this DAVIS folder (JPEGImages/480p, Annotations/480p, "
                        "ImageSets); every model at its own input scale, as fmapicon eval (default: none)")
    parser.add_argument("--davis-set", metavar="SET", default=None,
                        help="the DAVIS sequence list (ImageSets/SET.txt or ImageSets/2017/SET.txt) "
                        "(default: val, or the folder's only list)")
    parser.add_argument("--pairs", metavar="DIR", type=existing_folder, default=None,
                        help="also measure EPE on FlyingChairs-style pairs NNNNN-img0.ppm, -img1.ppm, -gt.flo "
                        "(default: none)")
    parser.add_argument("--quick", action="store_true", default=False,
                        help="a tiny version of every stage in about a minute (for tests and CI; the numbers "
                        "mean little) (default: off)")
    parser.add_argument("--force", action="store_true", default=False,
                        help="replace the outputs of an earlier demo in --out once the new ones are complete (other "
                        "files are kept; a failed or interrupted run leaves them as they were) (default: refuse "
                        "a non-empty folder)")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="auto (CUDA when available), cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the weights, the data order and the scenes; held-out scenes never "
                        "coincide with training's (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                        help="no progress bars (default: show them on stderr)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from fmapicon.bench import format_table
    from fmapicon.experiments.demo import MODELS, DemoConfig, run_demo

    config = DemoConfig(out=args.out, data=list(args.data), minutes=args.minutes, steps=args.steps,
                        davis=args.davis, davis_set=args.davis_set, pairs=args.pairs, quick=args.quick,
                        force=args.force, device=args.device, seed=args.seed, progress=args.progress)
    results = run_demo(config, say=lambda text: print(text, flush=True))
    columns = ["model", "jf_mean", "epe_mean", "ic_error_mean", "davis_jf_mean", "pairs_epe_mean"]
    rows = [{"model": name, **{c: results["models"][name][c] for c in columns[1:]}} for name in MODELS]
    print(format_table(rows, columns))
    print(f"wrote {os.path.join(args.out, 'report.html')} and {os.path.join(args.out, 'results.json')}")
    return 0
