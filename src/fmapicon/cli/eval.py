"""``fmapicon eval``: propagate the first masks of a DAVIS set with a model, write and score them."""

from __future__ import annotations

from fmapicon.cli._protocol import (add_protocol_arguments, add_run_arguments, apply_threads,
                                    protocol_params)
from fmapicon.cli.score import sequence_list


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="label propagation on DAVIS (CRW protocol) and its J&F",
        description="Propagate each sequence's first mask through its frames with the features of "
        "MODEL (the protocol of CRW, ajabri/videowalk, every value a flag), write DIR/<seq>/<frame>.png "
        "(indexed, DAVIS palette), score them like the official toolkit (DIR/*.csv) and record the "
        "protocol actually used with timings in DIR/eval.json.",
    )
    parser.add_argument("--davis", required=True, metavar="ROOT",
                        help="DAVIS folder with JPEGImages/480p/, Annotations/480p/ and ImageSets/ (required)")
    parser.add_argument("--badja", default=None, metavar="DIR",
                        help="score keypoint propagation on BADJA instead (DIR: <sequence>.json files) with "
                        "PCK-T; --davis then gives the frames (several roots: ROOT,ROOT2), writing "
                        "DIR/pck.json and DIR/pck-per-sequence.csv")
    parser.add_argument("--set", dest="set_name", default=None, metavar="NAME",
                        help="sequence list ImageSets/2017/NAME.txt or ImageSets/NAME.txt (default: val, or "
                        "the folder's only list)")
    parser.add_argument("--sequences", type=sequence_list, default=None, metavar="A,B,C",
                        help="these sequences instead of the set's list (default: the whole set); with "
                        "--badja, these BADJA sequences (default: every one in DIR)")
    parser.add_argument("--model", required=True, metavar="M",
                        help="reference (the model shipped in the package, offline), a run folder or "
                        "checkpoint file, or a baseline: copy (first mask repeated), pixels (Lab colour "
                        "patches), random (untrained short U-Net, fixed seed; random:NET another backbone, "
                        "e.g. random:resnet-s4), xfeat "
                        "(pretrained XFeat, needs the xfeat extra) (required)")
    parser.add_argument("--out", default="runs/eval", metavar="DIR",
                        help="output folder for predictions, CSVs and eval.json; must not exist or be empty "
                        "unless --force (default: runs/eval)")
    parser.add_argument("--force", action="store_true", default=False,
                        help="replace an earlier evaluation in DIR once the new one is complete (its sequence "
                        "folders, CSVs and eval.json; other files are kept; a failed or interrupted run "
                        "leaves the earlier one as it was) (default: refuse a non-empty DIR)")
    parser.add_argument("--protocol", choices=["crw", "original"], default="crw",
                        help="crw: context of first + previous frames, local radius, top-k (default); "
                        "original: the original code's hard nearest neighbour in the first frame at 1/4 scale")
    add_protocol_arguments(parser)
    parser.add_argument("--exclude-void", action="store_true", default=False,
                        help="exclude void (255) pixels from J and F (the toolkit, in effect, does not)")
    add_run_arguments(parser)
    parser.set_defaults(run=run)


def _run_badja(args) -> int:
    from fmapicon.evaluation.keypoints import evaluate_badja
    from fmapicon.paths import display_path
    from fmapicon.runtime import check_output_folder

    check_output_folder(args.out, args.force, "the earlier BADJA scores")  # refused now, replaced when done
    record = evaluate_badja(args.model, args.badja, args.davis.split(","), args.out, protocol_params(args),
                            device=args.device, progress=args.progress, sequences=args.sequences)
    mean = record["pck_t_mean"]
    print(f"PCK-T mean over {len(record['sequences'])} sequences: {'-' if mean is None else f'{mean:.3f}'}")
    print(f"wrote {display_path(args.out)}/pck.json")
    return 0


def run(args) -> int:
    apply_threads(args)
    if args.badja:
        return _run_badja(args)
    from fmapicon.evaluation.davis_eval import evaluate_davis
    from fmapicon.paths import display_path
    from fmapicon.runtime import check_output_folder

    check_output_folder(args.out, args.force, "the earlier evaluation")  # refused now, replaced when done

    params = protocol_params(args, args.protocol)
    result = evaluate_davis(args.model, args.davis, args.out, args.set_name, args.sequences, params,
                            device=args.device, exclude_void=args.exclude_void, progress=args.progress)
    totals = result["totals"]
    print(result["table"])
    if totals["frames"]:
        print(f"{totals['frames']} frames: features {totals['features_s']:.1f} s "
              f"({totals['features_s_per_frame']:.3f} s/frame), propagation {totals['propagation_s']:.1f} s "
              f"({totals['propagation_s_per_frame']:.3f} s/frame)")
    if result["skipped"]:
        skipped = ", ".join(display_path(name) for name in result["skipped"])
        print(f"{len(result['skipped'])} sequence(s) skipped with nothing to score: {skipped}")
    print(f"wrote {display_path(result['eval_json'])}")
    return 0
