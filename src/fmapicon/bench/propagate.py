"""Label propagation speed on DAVIS frames: seconds per frame, feature extraction vs propagation.

Runs ``fmapicon.evaluation.propagate.propagate_sequence`` (the CRW protocol of ``fmapicon eval``, same
flags) on a few sequences and times its two phases, seconds per frame of feature
extraction and of propagation apart, for the model and (``--baseline``, default ``pixels``)
a second model in the same run, so that their ratio is measured under the same load;
nothing is written or scored. With ``--repeat N`` each sequence is timed N times, the model's
and the baseline's runs alternating, and each row is the sequence's fastest run (the least
disturbed by other jobs on a shared machine). Defaults:
``$FMAPICON_DATA/davis2016-dev`` (``runtime.shared_data_dir``) when present, its 2 shortest
sequences, ``--model random`` (the untrained short U-Net: the cost of a trained short U-Net)
seen at 1/4 of the frame size (the scale the original trains at). The last row extrapolates
the measured seconds per frame to every frame of the set: on a shared machine, measure a
few sequences and say that the total is extrapolated.
"""

from __future__ import annotations

import time
from pathlib import Path

HELP = "label propagation: seconds per frame, feature extraction vs propagation, on DAVIS frames"

RANDOM_INPUT_SCALE = 0.25


def add_arguments(parser) -> None:
    from fmapicon.cli._protocol import add_protocol_arguments
    from fmapicon.cli._types import device_name, positive_int
    from fmapicon.cli.score import sequence_list

    parser.add_argument("--davis", default=None, metavar="ROOT",
                        help="DAVIS folder (default: $FMAPICON_DATA/davis2016-dev when present)")
    parser.add_argument("--set", dest="set_name", default=None, metavar="NAME",
                        help="sequence list (default: val, else the root's only list, e.g. dev)")
    parser.add_argument("--sequences", type=sequence_list, default=None, metavar="A,B",
                        help="sequences to time (default: the --count shortest of the set)")
    parser.add_argument("--count", type=positive_int, default=2,
                        help="how many of the shortest sequences to time when --sequences is not given (default: 2)")
    parser.add_argument("--frames", type=positive_int, default=None,
                        help="time only the first N frames of each sequence (default: all)")
    parser.add_argument("--model", default="random",
                        help="run folder, checkpoint, pixels, random or xfeat (default: random, the short U-Net)")
    parser.add_argument("--protocol", choices=["crw", "original"], default="crw", help="(default: crw)")
    add_protocol_arguments(parser, input_scale_default=f"the model's; {RANDOM_INPUT_SCALE} for random")
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.add_argument("--baseline", default="pixels",
                        help="a second model timed in the same run, for a ratio measured under the same "
                        "load (default: pixels; 'none' to skip)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeat", type=positive_int, default=1,
                        help="time each sequence N times, the model's and the baseline's runs alternating, and "
                        "report its fastest run (default: 1)")


def _root(davis) -> Path:
    from fmapicon.errors import UserError
    from fmapicon.runtime import shared_data_dir

    if davis:
        return Path(davis)
    shared = shared_data_dir()
    if shared is None or not (shared / "davis2016-dev").is_dir():
        raise UserError("no --davis given and no davis2016-dev in the data folder ($FMAPICON_DATA): "
                        "pass --davis ROOT")
    return shared / "davis2016-dev"


def main(args) -> int:
    import dataclasses

    import torch

    from fmapicon.bench import report
    from fmapicon.data.davis import frame_paths, layout, resolve_set, sequence_names
    from fmapicon.evaluation.features import load_model
    from fmapicon.cli._protocol import protocol_params
    from fmapicon.runtime import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    root = _root(args.davis)
    set_name = resolve_set(root, args.set_name)
    images_dir, annotations_dir = layout(root)
    everything = {name: len(frame_paths(images_dir, name)) for name in sequence_names(root, set_name)}
    names = args.sequences or sorted(everything, key=everything.get)[: args.count]
    runs = []                                   # (spec, model, params) of the model, then the baseline
    for spec in [args.model] + ([args.baseline] if args.baseline not in ("none", args.model) else []):
        model = load_model(spec, resolve_device(args.device), stride=args.stride)
        scale = args.input_scale or (RANDOM_INPUT_SCALE if spec == "random" else model.default_input_scale)
        runs.append((spec, model, dataclasses.replace(protocol_params(args, args.protocol), input_scale=scale)))
    fastest = [{} for _ in runs]                # per run, sequence -> its fastest row
    for _ in range(args.repeat):
        for name in names:
            for best, (_, model, params) in zip(fastest, runs):
                row = _time_sequence(model, images_dir, annotations_dir, name, params, args.frames)
                if name not in best or row["total_s"] < best[name]["total_s"]:
                    best[name] = row
    timed = [fastest[0][name] for name in names]
    rows = timed + [_total_row("measured", timed)]
    baseline_rows = []
    if len(runs) > 1:
        timed = [{**fastest[1][name], "sequence": f"{runs[1][0]}: {name}"} for name in names]
        baseline_rows = timed + [_total_row(f"{runs[1][0]}: measured", timed)]
    _, model, params = runs[0]
    scale = params.input_scale
    per_frame = rows[-1]["total_s_per_frame"]
    all_frames = sum(everything.values())
    rows.append({"sequence": f"all {len(everything)} (extrapolated)", "frames": all_frames,
                 "total_s": per_frame * all_frames, "total_s_per_frame": per_frame})
    rows += baseline_rows
    notes = [f"model {model.name} at input scale {scale}, device {args.device}, {torch.get_num_threads()} threads",
             f"the extrapolated row is from {rows[len(rows) - len(baseline_rows) - 2]['frames']} measured frames "
             f"to the {all_frames} frames "
             f"of set {set_name!r} ({all_frames * per_frame / 60:.1f} minutes)",
             "timings on a shared machine are noisy: compare ratios measured in the same run; cpu_s_per_frame "
             "is the process CPU time (all threads), close to the unloaded wall time with --threads 1"]
    if args.repeat > 1:
        notes.append(f"each row: the sequence's fastest of {args.repeat} runs, the model's and the baseline's "
                     "alternating")
    if baseline_rows:
        ratio = rows[len(names)]["propagation_s"] / baseline_rows[-1]["propagation_s"]
        notes.append(f"propagation, {model.name} / {runs[1][0]}: {ratio:.3f}")
    report("propagate", rows, args.json, notes=notes, extra={"params": dataclasses.asdict(params), "davis": str(root),
                                                     "repeat": args.repeat},
           columns=["sequence", "frames", "size", "features_s", "propagation_s", "features_s_per_frame",
                    "propagation_s_per_frame", "total_s", "total_s_per_frame", "cpu_s_per_frame"])
    return 0


def _time_sequence(model, images_dir, annotations_dir, name, params, limit) -> dict:
    """Propagate one sequence (its first ``limit`` frames) and time the two phases."""
    from fmapicon.data.davis import annotation_paths, frame_paths, read_annotation, read_frames
    from fmapicon.evaluation.propagate import propagate_sequence

    frames = read_frames(frame_paths(images_dir, name)[:limit])
    first = read_annotation(annotation_paths(annotations_dir, name)[0])
    cpu = time.process_time()
    _, timing = propagate_sequence(model, frames, first, params, progress=False, name=name)
    cpu = time.process_time() - cpu
    count = len(frames)
    total = timing["features_s"] + timing["propagation_s"]
    return {"sequence": name, "frames": count, "size": f"{frames.shape[2]}x{frames.shape[1]}",
            "features_s": timing["features_s"], "propagation_s": timing["propagation_s"],
            "features_s_per_frame": timing["features_s"] / count,
            "propagation_s_per_frame": timing["propagation_s"] / count,
            "total_s": total, "total_s_per_frame": total / count, "cpu_s_per_frame": cpu / count}


def _total_row(label: str, rows: list[dict]) -> dict:
    frames = sum(r["frames"] for r in rows)
    features = sum(r["features_s"] for r in rows)
    propagation = sum(r["propagation_s"] for r in rows)
    return {"sequence": label, "frames": frames, "features_s": features, "propagation_s": propagation,
            "features_s_per_frame": features / frames, "propagation_s_per_frame": propagation / frames,
            "total_s": features + propagation, "total_s_per_frame": (features + propagation) / frames,
            "cpu_s_per_frame": sum(r["cpu_s_per_frame"] * r["frames"] for r in rows) / frames}
