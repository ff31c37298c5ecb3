"""The propagation protocol's flags, shared by ``fmapicon eval`` and ``fmapicon track``."""

from __future__ import annotations

from fmapicon.cli._types import device_name, positive_float, positive_int


def add_protocol_arguments(parser, input_scale_default: str = "the checkpoint's training scale from its config, "
                           "1 for baselines") -> None:
    """The CRW protocol's flags (``fmapicon.evaluation.propagate.PropagationParams``);
    ``input_scale_default`` says in ``--input-scale``'s help what None means to the caller."""
    parser.add_argument("--input-scale", type=positive_float, default=None, metavar="S",
                        help=f"scale of the frames the network sees (default: {input_scale_default}); "
                        "smaller is faster and coarser")
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
    parser.add_argument("--pixels-weight", type=float, default=None, metavar="W",
                        help="fuse the affinities with the pixels baseline's: (1 - W) cos(model) + W "
                        "cos(Lab colour patches), W in [0, 1); 0: the model's features alone (default: the "
                        "value the model's weights record as validated, 0.85 for reference; 0 for others)")
    parser.add_argument("--restrict-first", action="store_true", default=False,
                        help="apply the radius to the first frame too (CRW leaves it global; default: off)")
    parser.add_argument("--tile", type=positive_int, default=4,
                        help="query tile side in cells: memory and speed only, never the result (default: 4)")
    parser.add_argument("--batch-size", type=positive_int, default=4,
                        help="frames per batch in feature extraction (default: 4)")


def add_run_arguments(parser) -> None:
    """``--device`` and ``--no-progress`` of the commands that propagate (``eval``, ``track``)."""
    parser.add_argument("--device", type=device_name, default="auto",
                        help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                        help="no progress bars (default: show them on stderr)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads for features and affinities (default: torch's choice, one per "
                        "core); fewer leaves cores to other work on a shared machine")


def apply_threads(args) -> None:
    """``torch.set_num_threads(args.threads)`` when ``--threads`` was given."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def protocol_params(args, protocol: str = "crw"):
    """``PropagationParams`` from the parsed flags."""
    from fmapicon.evaluation.propagate import PropagationParams

    return PropagationParams(
        protocol=protocol, input_scale=args.input_scale, stride=args.stride, context=args.context,
        radius=args.radius, topk=args.topk, temperature=args.temperature, pixels_weight=args.pixels_weight,
        restrict_first=args.restrict_first, tile=args.tile, batch_size=args.batch_size)
