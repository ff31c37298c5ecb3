"""``fmapicon synth OUT``: write procedural scenes with exact masks and flow (DAVIS-2017 layout)."""

from __future__ import annotations

import argparse

from fmapicon.cli._types import at_least, positive_int


def _set_name(text: str) -> str:
    if not text or "/" in text or "\\" in text or text.startswith("."):
        raise argparse.ArgumentTypeError(f"a set name is a plain file stem such as val or train, got {text!r}")
    return text


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write synthetic video scenes with exact masks and optical flow",
        description="Procedural scenes: a textured background under camera motion and M textured "
        "objects moving (translation, rotation, scale) with occlusions. Written in the DAVIS-2017 "
        "layout (JPEGImages/480p, Annotations/480p with ids 1..M, ImageSets/2017/SET.txt), with the "
        "exact forward flow Flow/SEQ/00000.flo (frame t -> t+1) and Videos/SEQ.mp4. "
        "The same arguments give the same bytes.",
    )
    parser.add_argument("out", metavar="OUT",
                        help="output folder (must be empty, or a previous synth output with --force)")
    parser.add_argument("--sequences", type=positive_int, default=4, help="number of sequences (default 4)")
    parser.add_argument("--frames", type=at_least(2), default=30, help="frames per sequence (default 30)")
    parser.add_argument("--size", type=at_least(16), nargs=2, default=[256, 256], metavar=("H", "W"),
                        help="frame height and width in pixels; even when writing video (default 256 256)")
    parser.add_argument("--objects", type=at_least(0), default=3,
                        help="moving objects per sequence, ids 1..M (default 3)")
    parser.add_argument("--seed", type=at_least(0), default=0,
                        help="seed of the set; training on 'synth' uses seed 1 by default, so 0 stays held out "
                        "(default 0)")
    parser.add_argument("--set", dest="set_name", type=_set_name, default="val",
                        help="image-set name: ImageSets/2017/SET.txt (default val)")
    parser.add_argument("--no-video", dest="video", action="store_false", help="skip Videos/*.mp4 (no PyAV needed)")
    parser.add_argument("--force", action="store_true",
                        help="replace a previous synth output in OUT once the new scenes are complete (other files "
                        "there are never deleted)")
    parser.set_defaults(run=run)


def run(args) -> int:
    import time
    from pathlib import Path

    from fmapicon.data.synth_layout import write_scenes

    start = time.perf_counter()
    names = write_scenes(args.out, sequences=args.sequences, frames=args.frames, size=tuple(args.size),
                         objects=args.objects, seed=args.seed, set_name=args.set_name, video=args.video,
                         overwrite=args.force)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    height, width = args.size
    print(f"wrote {len(names)} sequences x {args.frames} frames ({height} x {width}, {args.objects} objects, "
          f"seed {args.seed}) to {out} in {seconds:.1f} s:")
    print(f"  {out / 'JPEGImages' / '480p'}/{{{names[0]}..{names[-1]}}}/00000.jpg ...")
    print(f"  {out / 'Annotations' / '480p'}/<seq>/00000.png ...   (indexed, ids 1..{args.objects})")
    print(f"  {out / 'Flow'}/<seq>/00000.flo ...   (frame t -> t+1, {args.frames - 1} per sequence)")
    print(f"  {out / 'ImageSets' / '2017' / (args.set_name + '.txt')}")
    if args.video:
        print(f"  {out / 'Videos'}/<seq>.mp4")
    return 0
