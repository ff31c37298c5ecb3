"""``fmapicon eval``: propagate the first masks of a DAVIS set with a model, write and score them."""

from __future__ import annotations

from fmapicon.cli._types import device_name, positive_float, positive_int
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
    parser.add_argument("--set", dest="set_name", default=None, metavar="NAME",
                        help="sequence list ImageSets/2017/NAME.txt or ImageSets/NAME.txt (default: val, or "
                        "the folder's only list)")
    parser.add_argument("--sequences", type=sequence_list, default=None, metavar="A,B,C",
                        help="these sequences instead of the set's list (default: the whole set)")
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
    parser.add_argument("--input-scale", type=positive_float, default=None, metavar="S",
                        help="scale of the frames the network sees (default: the checkpoint's training "
                        "scale from its config, 1 for baselines); smaller is faster and coarser")
    parser.add_argument("--stride", type=positive_int, default=8,
                        help="feature cell size in full-size pixels (default: 8, as CRW)")
    parser.add_argument("--context", type=positive_int, default=20,
                        help="previous frames in the context besides the first (default: 20)")
    parser.add_argument("--radius", type=positive_float, default=12.0,
                        help="spatial radius of affinities to previous frames, in feature cells (default: 12)")
    parser.add_argument("--topk", type=positive_int, default=10,
                        help="affinities kept per query cell over all context keys (default: 10)")
    parser.add_argument("--temperature", type=positive_float, default=0.05,
                        help="softmax temperature on cosine affinities (default: 0.05)")
    parser.add_argument("--pixels-weight", type=float, default=0.0, metavar="W",
                        help="fuse the affinities with the pixels baseline's: (1 - W) cos(model) + W "
                        "cos(Lab colour patches), W in [0, 1) (default: 0, the model alone)")
    parser.add_argument("--restrict-first", action="store_true", default=False,
                        help="apply the radius to the first frame too (CRW leaves it global; default: off)")
    parser.add_argument("--tile", type=positive_int, default=4,
                        help="query tile side in cells: memory and speed only, never the result (default: 4)")
    parser.add_argument("--batch-size", type=positive_int, default=4,
                        help="frames per batch in feature extraction (default: 4)")
    parser.add_argument("--exclude-void", action="store_true", default=False,
                        help="exclude void (255) pixels from J and F (the toolkit, in effect, does not)")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                        help="no progress bars (default: show them on stderr)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from fmapicon.evaluation.davis_eval import evaluate_davis
    from fmapicon.evaluation.propagate import PropagationParams
    from fmapicon.paths import display_path
    from fmapicon.runtime import check_output_folder

    check_output_folder(args.out, args.force, "the earlier evaluation")  # refused now, replaced when done

    params = PropagationParams(
        protocol=args.protocol, input_scale=args.input_scale, stride=args.stride, context=args.context,
        radius=args.radius, topk=args.topk, temperature=args.temperature,
        pixels_weight=args.pixels_weight, restrict_first=args.restrict_first, tile=args.tile,
        batch_size=args.batch_size)
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
