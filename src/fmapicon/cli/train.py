"""``fmapicon train``: train a feature network; the work is ``fmapicon.train.train``.

Values come from, lowest first: the defaults of ``--recipe`` (reference, or original: the
original code's final recipe), the
``--config`` file (TOML or JSON, keys as the flags with - or _), then the flags given.
``--resume RUN`` takes the run's own config; only --steps, --device, --workers and
--minutes may be given with it.

Exit status: 0 when the run finished; 2 for a usage error (bad value, occupied or
unwritable --out, ...); 1 when training diverged (non-finite steps in a row); 130 / 143
after Ctrl-C / SIGTERM, once a checkpoint was saved (continue with --resume RUN).
"""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """Train a feature network with the FeatureMapICON objective on pairs of frames
(videos, frame folders, or synthetic scenes). Writes a run folder: config.json, metrics.jsonl
(loss, log_p, log_p_shuffled, lambda, lr, grad_norm, pairs_per_s), TensorBoard events (when
installed) and checkpoints/ (last.safetensors, state.pt). Many processes:
torchrun --nproc_per_node=K -m fmapicon train ... (gloo on CPU, nccl on CUDA; --batch is the
global batch). Exit status: 0 done, 1 diverged, 2 usage error, 130/143 after Ctrl-C/SIGTERM
(a checkpoint was saved; continue with --resume RUN)."""

DEFAULT_OUT = "runs/train"

# the --help sections: what the method is, what it trains on, how it optimizes, how a run behaves
KNOB_GROUPS = {
    "the method": ("the writeup's objective, augmentation and network (the knobs a study of the method turns)",
                   ("recipe", "net", "channels", "aug", "center", "lambda_init", "learn_lambda", "log_eps")),
    "data": ("what the pairs are made of", ("data", "size", "batch", "max_gap", "crop", "crop_min", "crop_max")),
    "optimization": ("how the objective is maximized",
                     ("init", "optim", "lr", "clip", "steps", "amp", "grad_accumulation")),
    "the run": ("processes, logging, checkpoints and evaluation along the way; none changes what is learned",
                ("workers", "seed", "device", "log_every", "save_every", "max_bad_steps", "eval_every", "davis",
                 "snapshot_every", "minutes")),
}


def register(subparsers) -> None:
    from fmapicon.train import REMOVED_OPTIONS, config_fields

    parser = subparsers.add_parser("train", help="train a feature network on videos, frame folders or synthetic "
                                   "scenes", description=DESCRIPTION)
    parser.add_argument("--out", metavar="RUN", default=None,
                        help=f"the run folder to write (default: {DEFAULT_OUT}); a non-empty one needs --resume "
                        "or --force")
    parser.add_argument("--config", metavar="FILE", default=None, type=_config_path,
                        help="a .toml or .json file of options (keys as the flags, - or _); flags given on the "
                        "command line override it (default: none)")
    parser.add_argument("--resume", metavar="RUN", default=None,
                        help="continue the run folder RUN at its last checkpoint with its own config; --steps "
                        "(the new total), --device, --workers and --minutes may change (default: a new run)")
    parser.add_argument("--force", action="store_true", default=False,
                        help="replace the run files (config, metrics, checkpoints, tensorboard) of a non-empty "
                        "--out (default: refuse)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                        help="no progress bar (default: show one on stderr)")
    groups = {title: parser.add_argument_group(title, about) for title, (about, _) in KNOB_GROUPS.items()}
    group_of = {name: title for title, (_, names) in KNOB_GROUPS.items() for name in names}
    for name, meta in config_fields().items():
        _add_knob(groups[group_of[name]], name, meta)
    for name in REMOVED_OPTIONS:  # refused with a reason rather than "unrecognized arguments"
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.set_defaults(run=run)


def _add_knob(parser, name: str, meta: dict) -> None:
    """One flag per TrainConfig field; SUPPRESS as the parser default marks the flags given."""
    flag = "--" + name.replace("_", "-")
    default = meta["default"]
    from fmapicon.train import RECIPE_VALUES

    shown = shown_default(default)
    original = RECIPE_VALUES["original"].get(name)
    if original is not None and original != default:
        shown = f"{shown}; with --recipe original: {shown_default(original)}"
    options = {"dest": name, "default": argparse.SUPPRESS, "help": help_text(f"{meta['help']} (default: {shown})")}
    if meta["kind"] == "bool":
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
    elif meta["kind"] == "list":
        parser.add_argument(flag, nargs="+", metavar="SRC", **options)
    else:
        metavar = "{" + ",".join(meta["choices"]) + "}" if meta["choices"] else name.upper()
        parser.add_argument(flag, type=_value_parser(name, meta["kind"]), metavar=metavar, **options)


def shown_default(default) -> str:
    """A default as the help shows it: on/off for booleans only (never for 1.0 or 0, which
    equal True and False), a list space-separated, anything else as it prints."""
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, list):
        return " ".join(str(v) for v in default)
    return str(default)


def help_text(text: str) -> str:
    """Help text for argparse: reStructuredText ``literals`` shown plain, % escaped."""
    return text.replace("``", "").replace("%", "%%")


def _value_parser(name: str, kind: str):
    """argparse ``type=``: convert, then check with TrainConfig's own rule."""
    from fmapicon.train import check_value

    convert = {"int": int, "float": float}.get(kind, str)

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind == 'int' else 'a number'}, "
                                             f"got {text!r}") from None
        problem = check_value(name, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def _config_path(text: str) -> str:
    if not text.lower().endswith((".toml", ".json")):
        raise argparse.ArgumentTypeError(f"expected a .toml or .json file, got {text!r}")
    return text


def given_options(args) -> dict:
    """The TrainConfig values given as flags (the others were suppressed)."""
    from fmapicon.train import config_fields

    return {name: getattr(args, name) for name in config_fields() if hasattr(args, name)}


def config_from_args(args):
    """(TrainConfig, run folder, resume) from parsed arguments: defaults < --config < flags."""
    from fmapicon.errors import UserError
    from fmapicon.train import REMOVED_OPTIONS, RESUMABLE, TrainConfig, load_config_file, saved_config

    removed = ["--" + name.replace("_", "-") for name in REMOVED_OPTIONS if hasattr(args, name)]
    if removed:
        raise UserError(f"{', '.join(removed)} no longer exist(s): measured no better than the reference recipe "
                        "(docs/experiments.md has the numbers and the commit that still runs them); drop them")
    given = given_options(args)
    if not args.resume:
        values = {**(load_config_file(args.config) if args.config else {}), **given}  # flags win; --recipe picks the base
        config = TrainConfig.from_mapping(values)
        if config.init:
            from fmapicon.train.model import init_network

            config, _ = init_network(config, given={key.replace("-", "_") for key in values})
        return config, args.out or DEFAULT_OUT, False
    fixed = sorted(set(given) - set(RESUMABLE))
    if fixed or args.config or args.force:
        extra = ["--" + n.replace("_", "-") for n in fixed] + ["--config"] * bool(args.config) + \
            ["--force"] * bool(args.force)
        raise UserError(f"--resume keeps the run's config; {', '.join(extra)} cannot be given with it (only "
                        f"{', '.join('--' + n for n in RESUMABLE)}); start a new --out to change others")
    if args.out and os.path.abspath(args.out) != os.path.abspath(args.resume):
        raise UserError(f"--resume {args.resume} continues that folder; drop --out {args.out}")
    return TrainConfig.from_mapping(given, base=saved_config(args.resume)), args.resume, True


def run(args) -> int:
    from fmapicon.train import TrainingDiverged, TrainingInterrupted, train

    config, out, resume = config_from_args(args)
    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        run_dir = train(config, out, resume=resume, force=args.force, progress=args.progress)
    except TrainingInterrupted as stop:
        if main_rank:
            print(f"fmapicon train: {stop}", file=sys.stderr)
        return stop.exit_status
    except TrainingDiverged as error:
        if main_rank:
            print(f"fmapicon train: {error}", file=sys.stderr)
        return 1
    if main_rank:
        from fmapicon.core.checkpoint import saved_step

        step = saved_step(run_dir)
        stopped_early = step is not None and step < config.steps
        budget = f" (the --minutes {config.minutes:g} budget ended it)" if stopped_early else ""
        print(f"fmapicon train: done, {step} of {config.steps} steps{budget}; run folder {run_dir}")
    return 0
