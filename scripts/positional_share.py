"""How much of a model's features is a code of position, and how alike neighbouring cells
are, on frames of many videos.

    python scripts/positional_share.py DAVIS_ROOT MODEL... [--every 8] [--json OUT]

Every ``--every``-th frame of each sequence of the root's list, features as ``fmapicon
eval`` computes them (the model at its recorded input scale, cells of ``--stride``), then
``fmapicon.evaluation.features.positional_share`` (the share of the feature variance that
the cell's location explains: 0 content only, 1 a pure positional code; ``pixels`` gives
what the scenes' own layout explains) and ``feature_geometry`` (the mean cosine of adjacent
cells and of any two cells of a frame, and the features' effective rank). Prints a table;
``--json`` writes it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fmapicon.data.davis import frame_paths, layout, sequence_names
from fmapicon.data.images import read_image, to_tensor
from fmapicon.evaluation.features import extract, feature_geometry, load_model, positional_share
from fmapicon.runtime import write_json


def model_features(model, frames: torch.Tensor, stride: int = 8) -> torch.Tensor:
    """``model``'s unit features of ``frames`` (K x 3 x H x W in [0, 1]) as ``fmapicon eval`` sees them."""
    scale = model.default_input_scale
    return torch.cat([extract(model, chunk, scale=scale, stride=stride) for chunk in frames.split(8)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("davis", help="a DAVIS root (480p frames of one size)")
    parser.add_argument("models", nargs="+", help="model specs as fmapicon eval --model takes them")
    parser.add_argument("--every", type=int, default=8, help="every N-th frame of each sequence (default: 8)")
    parser.add_argument("--stride", type=int, default=8, help="feature cell size in pixels (default: 8, as eval)")
    parser.add_argument("--json", help="write the table here as JSON")
    args = parser.parse_args()
    images_dir, _ = layout(args.davis)
    paths = [p for name in sequence_names(args.davis) for p in frame_paths(images_dir, name)[:: args.every]]
    frames = to_tensor(np.stack([read_image(p) for p in paths]))
    rows = []
    print(f"{len(paths)} frames of {tuple(frames.shape[-2:])}")
    print(f"{'model':<48} {'positional share':>16} {'adjacent cos':>12} {'pair cos':>8} {'eff. rank':>9}")
    for spec in args.models:
        maps = model_features(load_model(spec), frames, args.stride)
        row = {"model": spec, "positional_share": positional_share(maps), **feature_geometry(maps),
               "frames": len(paths), "stride": args.stride}
        rows.append(row)
        print(f"{spec:<48} {row['positional_share']:>16.3f} {row['adjacent_cosine']:>12.3f} "
              f"{row['pair_cosine']:>8.3f} {row['effective_rank']:>9.1f}")
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
