"""``fmapicon match A B``: register two images with a model's features.

Writes, under ``--out``:

- ``flow_ab.flo``: Phi^AB as a displacement at A's full resolution (Middlebury .flo, pixels);
- ``flow_ba.flo``: Phi^BA at B's full resolution;
- ``metrics.json``: ``ic_error_mean`` (pixels, |Phi^AB(Phi^BA(y)) - y| over B's pixels)
  and, with ``--gt-flow``, ``epe_mean``, ``epe_median``, ``outliers_3px`` of the written
  flow_ab against it over all pixels; and the settings used;
- ``match.png``: A, B, A warped onto B, the flow's colours, the inverse-consistency error.
"""

from __future__ import annotations

import argparse
import contextlib

from fmapicon.cli._types import device_name, non_negative_int, plain_text, positive_float, positive_int

#: what match writes under --out (replaced whole when a new match is complete)
OUTPUTS = ("flow_ab.flo", "flow_ba.flo", "metrics.json", "match.png")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "match",
        help="register two images: flows A->B and B->A, inverse-consistency error, EPE",
        description=plain_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image_a", metavar="A", help="the first image (PNG, JPEG or PPM)")
    parser.add_argument("image_b", metavar="B", help="the second image (PNG, JPEG or PPM)")
    parser.add_argument("--model", default="pixels",
                        help="reference (the model shipped in the package), a run folder or checkpoint, or a "
                        "baseline: pixels (Lab colour patches), random (untrained U-Net; random:NET another "
                        "backbone), xfeat (needs the xfeat extra) (default: %(default)s)")
    parser.add_argument("--out", default="match", help="output folder (default: %(default)s)")
    parser.add_argument("--force", action="store_true", default=False,
                        help="replace the earlier match in --out (once the new one is complete; other files "
                        "are kept); without it a folder that holds files is refused")
    parser.add_argument("--gt-flow", default=None, metavar="F.flo",
                        help="ground-truth flow A->B (.flo, A's size): adds epe_mean, epe_median, outliers_3px")
    parser.add_argument("--soft", action="store_true", default=False,
                        help="soft-argmax (the expected position under softmax) instead of argmax: "
                        "sub-cell displacements, but pulled towards the middle when matches are ambiguous")
    parser.add_argument("--temperature", type=positive_float, default=None,
                        help="soft-argmax temperature on unit features (default: 1/lambda^2 of the model, "
                        "1/144 when it has no trained lambda)")
    parser.add_argument("--stride", type=positive_int, default=4,
                        help="feature cells of this many pixels of the full-resolution images; smaller is "
                        "finer but costs (H W / stride^2)^2 dot products (default: %(default)s)")
    parser.add_argument("--radius", type=non_negative_int, default=None,
                        help="search only within this many cells of the same place (default: the whole image); "
                        "with --levels, the search radius around the coarser level's match (default: 2)")
    parser.add_argument("--levels", type=non_negative_int, default=0,
                        help="coarse to fine: halve both feature grids this many times, search the whole "
                        "image at the coarsest level only, then within --radius of the match found one "
                        "level up; large motions without far-away outliers (default: %(default)s, one flat "
                        "search)")
    parser.add_argument("--input-scale", type=positive_float, default=None,
                        help="resize the images by this factor for the network (default: the scale the "
                        "model was trained at, 1 for baselines)")
    parser.add_argument("--device", type=device_name, default="auto",
                        help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args) -> int:
    import time
    from pathlib import Path

    from fmapicon.data.images import read_image, to_tensor
    from fmapicon.evaluation.correspond import load_feature_model, match_images
    from fmapicon.data.flow import write_flo
    from fmapicon.runtime import check_output_folder, resolve_device, staged_output, write_json

    check_output_folder(args.out, args.force, "the earlier match")      # refused now, replaced when done
    device = resolve_device(args.device)
    image_a, image_b = (to_tensor(read_image(path), device)[None] for path in (args.image_a, args.image_b))
    gt_flow = _read_gt(args.gt_flow, tuple(image_a.shape[-2:])) if args.gt_flow else None
    model = load_feature_model(args.model, device, args.stride)
    start = time.perf_counter()
    with _flags_named():
        match = match_images(model, image_a, image_b, stride=args.stride, soft=args.soft,
                             temperature=args.temperature, radius=args.radius, input_scale=args.input_scale,
                             levels=args.levels)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    flow_ab = match.flow_ab[0].permute(1, 2, 0).cpu().numpy()
    metrics = _metrics(args, model, match, flow_ab, gt_flow, seconds)
    from fmapicon.experiments.figures import match_picture, save_png

    with staged_output(out, force=args.force, outputs=OUTPUTS, what="the earlier match") as staging:
        write_flo(staging / "flow_ab.flo", flow_ab)
        write_flo(staging / "flow_ba.flo", match.flow_ba[0].permute(1, 2, 0).cpu().numpy())
        write_json(staging / "metrics.json", metrics)
        save_png(staging / "match.png", match_picture(image_a, image_b, match, gt_flow))
    _print_summary(out, metrics)
    return 0


@contextlib.contextmanager
def _flags_named():
    """The library names its parameters (``radius must be >= 0 ...``); the user knows the flags."""
    from fmapicon.errors import UserError

    try:
        yield
    except ValueError as error:
        name = str(error).split(" ", 1)[0]
        if isinstance(error, UserError) or name not in ("stride", "radius", "levels", "temperature"):
            raise
        raise UserError(f"--{error}") from error


def _read_gt(path, size):
    from fmapicon.errors import UserError
    from fmapicon.data.flow import read_flo

    try:
        flow = read_flo(path)
    except FileNotFoundError as error:
        raise UserError(f"--gt-flow: {error}") from error
    if flow.shape[:2] != size:
        raise UserError(f"--gt-flow {path} is {flow.shape[1]} x {flow.shape[0]} pixels but image A is "
                        f"{size[1]} x {size[0]}: the ground truth must be the flow A->B at A's size")
    return flow


def _metrics(args, model, match, flow_ab, gt_flow, seconds: float) -> dict:
    from fmapicon.data.flow import epe_stats

    metrics = {"ic_error_mean": float(match.ic_error.mean())}
    if gt_flow is not None:
        metrics.update(epe_stats(flow_ab, gt_flow))
    metrics.update({
        "ic_error_median": float(match.ic_error.median()),
        "model": getattr(model, "name", str(args.model)),
        "image_a": str(args.image_a), "image_b": str(args.image_b),
        "gt_flow": str(args.gt_flow) if args.gt_flow else None,
        "size_a": list(match.flow_ab.shape[-2:]), "size_b": list(match.flow_ba.shape[-2:]),
        "stride": args.stride, "radius": args.radius, "levels": args.levels, "soft": args.soft,
        "temperature": match.temperature,
        "input_scale": args.input_scale if args.input_scale is not None else getattr(model, "default_input_scale", 1.0),
        "seconds": seconds,
    })
    return metrics


def _print_summary(out, metrics: dict) -> None:
    keys = ["ic_error_mean", "epe_mean", "epe_median", "outliers_3px", "seconds"]
    print("  ".join(f"{key} {metrics[key]:.4g}" for key in keys if key in metrics))
    from fmapicon.paths import display_path

    print(f"wrote {display_path(out)}/flow_ab.flo, flow_ba.flo, metrics.json, match.png")
