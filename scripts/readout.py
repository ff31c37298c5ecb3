"""Label propagation from one level of a trained strided network (``resnet-s4``/``-s8``).

    python scripts/readout.py DAVIS_ROOT MODEL --level decoder --out DIR [--input-scale S]
        [--sequences a,b,c]

Which of the network's maps carries the best features for propagation: the trained output
(``head``, what ``fmapicon eval`` uses: the head, then PixelCenter and NormScale), the
top-down map the head reads (``decoder``), or an encoder stage (``stage1``..``stage3``,
``fmapicon.core.resnet.StridedResNet.levels``). The level's map goes through ``fmapicon
eval``'s protocol with its default flags (``extract`` resamples it to 8-pixel cells and
unit-normalizes each); writes the same outputs as ``fmapicon eval --out DIR`` and prints
J&F. The input scale defaults to the model's recorded one.
"""

from __future__ import annotations

import argparse

from torch import nn

from fmapicon.core.resnet import LEVELS
from fmapicon.evaluation.davis_eval import evaluate_davis
from fmapicon.evaluation.features import FeatureModel, load_model


class Level(nn.Module):
    """``B x 3 x H x W`` -> the map ``level`` of a loaded strided model's backbone."""

    def __init__(self, model: FeatureModel, level: str):
        super().__init__()
        self.net, self.level = model.net, level
        # a trained model loads as UnitFeatures -> FeatureNet -> backbone; a baseline has none
        self.backbone = getattr(getattr(model.net, "net", None), "backbone", None)
        if not hasattr(self.backbone, "levels"):
            raise SystemExit(f"{model.name}: levels need a strided backbone (resnet-s4, resnet-s8)")
        self.stride = self.backbone.level_stride(level)

    def forward(self, images):
        return self.net(images) if self.level == "head" else self.backbone.levels(images)[self.level]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("davis", help="a DAVIS root")
    parser.add_argument("model", help="a run folder, checkpoint or shipped name (e.g. reference)")
    parser.add_argument("--level", choices=LEVELS, default="head", help="which map (default: head)")
    parser.add_argument("--out", required=True, help="output folder, as fmapicon eval --out")
    parser.add_argument("--input-scale", type=float, help="default: the model's recorded scale")
    parser.add_argument("--sequences", help="comma-separated sequence names (default: the root's list)")
    args = parser.parse_args()
    model = load_model(args.model, "cpu")
    level = Level(model, args.level).eval()
    scale = args.input_scale or model.default_input_scale
    features = FeatureModel(level, stride=level.stride, name=f"{args.model}:{args.level}", default_input_scale=scale)
    sequences = args.sequences.split(",") if args.sequences else None
    result = evaluate_davis(features, args.davis, args.out, sequences=sequences, device="cpu", progress=False)
    scores = result["global"]
    print(f"{args.model} {args.level} at input scale {scale:.3f}: J&F {scores['J&F-Mean']:.3f} "
          f"(J {scores['J-Mean']:.3f}, F {scores['F-Mean']:.3f})")


if __name__ == "__main__":
    main()
