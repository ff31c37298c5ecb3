"""``fmapicon score``: J&F of predicted masks against a DAVIS folder, as the official toolkit."""

from __future__ import annotations

import argparse


def sequence_list(text: str) -> list[str]:
    """``a,b,c`` -> ["a", "b", "c"] (argparse type: refuses an empty list)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated sequence names, got {text!r}")
    return names


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "score",
        help="J&F of predicted masks against DAVIS ground truth (the official toolkit's numbers)",
        description="Score predictions RESULTS/<seq>/<frame>.png (indexed PNGs, or 0/255 grayscale for "
        "one object) against DAVIS annotations (2017 palette or 2016 0/255) exactly as the "
        "davis2017-evaluation toolkit: objects are the ids of the first frame, the first and last "
        "frames are not scored. Writes global_results-<set>.csv and per-sequence_results-<set>.csv "
        "into RESULTS and prints the table.",
    )
    parser.add_argument("--davis", required=True, metavar="ROOT",
                        help="DAVIS folder with Annotations/480p/<seq>/ and ImageSets/ (required)")
    parser.add_argument("--set", dest="set_name", default=None, metavar="NAME",
                        help="sequence list ImageSets/2017/NAME.txt or ImageSets/NAME.txt (default: val, or "
                        "the folder's only list, as eval)")
    parser.add_argument("--results", required=True, metavar="DIR",
                        help="folder of predictions, one sub-folder per sequence (required)")
    parser.add_argument("--sequences", type=sequence_list, default=None, metavar="A,B,C",
                        help="score these sequences instead of the set's list (default: the whole set)")
    parser.add_argument("--exclude-void", action="store_true", default=False,
                        help="exclude void (255) pixels from J and F; the official toolkit, in effect, "
                        "counts them as background (default: as the toolkit)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                        help="no progress bar (default: show one on stderr)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from fmapicon.evaluation.metrics import format_results, score_davis, write_results
    from fmapicon.paths import display_path
    from fmapicon.runtime import staged_output

    results = score_davis(args.davis, args.results, args.set_name, args.sequences,
                          exclude_void=args.exclude_void, progress=args.progress)
    with staged_output(args.results, force=True) as staging:  # both CSVs replace the earlier pair together
        names = [path.name for path in write_results(results, staging, results["set"])]
    print(format_results(results))
    if results["skipped"]:
        skipped = ", ".join(display_path(name) for name in results["skipped"])
        print(f"{len(results['skipped'])} sequence(s) skipped with nothing to score: {skipped}")
    for name in names:
        print(f"wrote {display_path(Path(args.results) / name)}")
    return 0
