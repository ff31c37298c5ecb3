"""Training pairs per second from videos, frame folders and on-the-fly synthetic scenes.

Synthetic scenes are written to a temporary folder first (``fmapicon synth``), so the
videos (Videos/*.mp4, H.264) and the frame folders (JPEGImages, JPEG) hold the same
frames; real DAVIS frames are added when ``--davis ROOT`` is given or the data folder is
present. Each source is read through a torch DataLoader with 0 and with N workers; the
time counts from creating the iterator (worker start-up included) to the last batch.
"""

from __future__ import annotations

import argparse

from fmapicon.cli._types import at_least, non_negative_int, positive_int

HELP = "pairs per second: videos vs frame folders vs synth, with and without DataLoader workers"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=positive_int, default=256, help="pairs to load per measurement (default 256)")
    parser.add_argument("--batch", type=positive_int, default=16, help="DataLoader batch size (default 16)")
    parser.add_argument("--size", type=at_least(8), default=120, help="training size S (default 120)")
    parser.add_argument("--workers", type=non_negative_int, nargs="+", default=[0, 2],
                        help="DataLoader worker counts to compare (default 0 2)")
    parser.add_argument("--sequences", type=positive_int, default=4, help="synthetic sequences to write (default 4)")
    parser.add_argument("--frames", type=positive_int, default=60, help="frames per synthetic sequence (default 60)")
    parser.add_argument("--scene-size", type=positive_int, default=256,
                        help="synthetic frame side in pixels (default 256)")
    parser.add_argument("--davis", metavar="ROOT", default=None,
                        help="a DAVIS root to include (default: $FMAPICON_DATA/davis2016-dev when present; "
                        "'' leaves it out)")
    parser.add_argument("--no-synth", dest="synth", action="store_false",
                        help="leave out the on-the-fly 'synth' source")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch threads in the main process, which collates the batches (DataLoader "
                        "workers use 1); on a busy machine torch's thread pool can make the collation "
                        "the bottleneck (default 1)")


def _throughput(dataset, workers: int, pairs: int, batch: int) -> dict:
    import time

    import torch

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    seen = 0
    for images_a, _ in loader:
        seen += images_a.shape[0]
        if seen >= pairs:
            break
    seconds = time.perf_counter() - start
    return {"pairs": seen, "seconds": seconds, "pairs_per_s": seen / seconds}


def _sources(args, scratch) -> dict:
    from pathlib import Path

    from fmapicon.runtime import shared_data_dir
    from fmapicon.data.synth_layout import write_scenes

    write_scenes(scratch, sequences=args.sequences, frames=args.frames, size=(args.scene_size, args.scene_size),
                 objects=3, seed=0)
    sources = {"video (mp4)": str(Path(scratch) / "Videos"), "frames (jpg)": str(Path(scratch) / "JPEGImages")}
    davis = args.davis
    if davis is None and shared_data_dir() is not None and (shared_data_dir() / "davis2016-dev").is_dir():
        davis = str(shared_data_dir() / "davis2016-dev")
    if davis:
        sources["davis 480p (jpg)"] = davis
    if args.synth:
        sources["synth (on the fly)"] = "synth:scenes=16"
    return sources


def main(args) -> int:
    import tempfile

    from fmapicon.bench import report
    from fmapicon.data.pairs import FramePairs

    import torch

    torch.set_num_threads(max(1, args.threads))
    rows = []
    with tempfile.TemporaryDirectory(prefix="fmapicon-bench-data-") as scratch:
        for name, source in _sources(args, scratch).items():
            dataset = FramePairs(source, size=args.size, cache_dir=f"{scratch}/cache")
            for workers in args.workers:
                result = _throughput(dataset, workers, args.pairs, args.batch)
                rows.append({"source": name, "clips": dataset.summary["clips"], "workers": workers, **result})
                print(f"{name:>20}  workers={workers}  {result['pairs_per_s']:.1f} pairs/s", flush=True)
    notes = [f"S={args.size}, batch {args.batch}, max_gap 30, centre crop, {args.threads} torch thread(s) "
             f"in the main process; synthetic scenes "
             f"{args.sequences} x {args.frames} frames at {args.scene_size}^2 (H.264 crf 16, GOP 12)",
             "shared machines are noisy: compare rows of the same run"]
    report("data", rows, args.json, notes=notes,
           columns=["source", "clips", "workers", "pairs", "seconds", "pairs_per_s"])
    return 0
