"""``fmapicon track SOURCE --mask FILE --out DIR``: follow objects and points through your own video."""

from __future__ import annotations

import argparse

from fmapicon.cli._protocol import (add_protocol_arguments, add_run_arguments, apply_threads,
                                    protocol_params)
from fmapicon.cli._types import non_negative_int


def _mask_spec(text: str) -> tuple[str, int | None]:
    """``FILE`` or ``FILE@N`` (the frame it annotates)."""
    path, at, frame = text.rpartition("@")
    if not at:
        return text, None
    if not frame.isdigit():
        raise argparse.ArgumentTypeError(f"the frame after @ must be a whole number >= 0, got {frame!r} in {text!r}")
    return path, int(frame)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "track",
        help="follow objects (a first-frame mask) and points through a video",
        description="Propagate the objects of a mask and/or query points through SOURCE (a video file, or a "
        "folder of frames in natural order) with the features of MODEL and the CRW protocol of fmapicon eval "
        "(same flags, so that on a DAVIS sequence track gives eval's masks). Writes DIR/masks/<frame>.png "
        "(indexed, DAVIS palette), DIR/points.csv (id,frame,x,y,score), DIR/overlay.mp4 (H.264) and "
        "DIR/track.json (source, model, protocol, frames, timings). Memory grows with --context, not with "
        "the video's length.",
    )
    parser.add_argument("source", metavar="SOURCE", help="a video file (.mp4, .mov, ...) or a folder of frames")
    parser.add_argument("--mask", dest="masks", action="append", type=_mask_spec, default=[], metavar="FILE[@N]",
                        help="object ids of frame N (default 0, or --mask-frame): an indexed, 0/255 or "
                        "DAVIS-coloured PNG; repeat with @N for objects that enter or are added at frame N (it "
                        "restarts the short-term context, so the frames before it cannot outvote its objects)")
    parser.add_argument("--mask-frame", type=non_negative_int, default=0, metavar="N",
                        help="the frame a --mask without @N annotates (default: 0)")
    parser.add_argument("--points", default=None, metavar="FILE.csv",
                        help="query points: a CSV with a header frame,x,y[,id] (pixels of the frames)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder; must not exist or be empty unless --force (required)")
    parser.add_argument("--force", action="store_true", default=False,
                        help="replace an earlier track's outputs in DIR (other files are kept)")
    parser.add_argument("--model", default="reference", metavar="M",
                        help="reference (shipped, default), a run folder or checkpoint, pixels, random or xfeat")
    add_protocol_arguments(parser)
    parser.add_argument("--no-overlay", dest="overlay", action="store_false", default=True,
                        help="skip DIR/overlay.mp4 (no PyAV encoding)")
    add_run_arguments(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    apply_threads(args)
    from fmapicon.errors import UserError
    from fmapicon.experiments.track_video import OUTPUTS, write_track
    from fmapicon.runtime import check_output_folder

    if not args.masks and not args.points:
        raise UserError("nothing to track: give --mask FILE (objects of the first frame) and/or --points FILE.csv")
    masks = {}
    for path, frame in args.masks:
        frame = args.mask_frame if frame is None else frame
        if frame in masks:
            raise UserError(f"two masks for frame {frame} ({masks[frame]} and {path}): give one mask per frame")
        masks[frame] = path
    check_output_folder(args.out, args.force, "the earlier track")  # refused now, replaced when done
    record = write_track(args.source, args.out, masks=masks, points=args.points, model=args.model,
                         params=protocol_params(args), device=args.device, overlay=args.overlay,
                         progress=args.progress)
    timings = record["timings"]
    frames = record["frames"]
    print(f"tracked {frames} frames: features {timings['features_s']:.1f} s, propagation "
          f"{timings['propagation_s']:.1f} s ({timings['propagation_s'] / max(frames, 1):.3f} s/frame)")
    print(f"wrote {args.out}/track.json")
    return 0
