"""Write a trained weights file into the package as float16, with its provenance.

    python scripts/ship_weights.py RUN_OR_FILE NAME --note "how it was made" [--default KEY=VALUE ...]

Reads RUN_OR_FILE (a run folder, a .safetensors file of `fmapicon train`, or a shipped
model's name), converts the floating-point tensors to float16 (about half the size;
`fmapicon.load` returns float32), keeps the run config in the metadata, adds
``fmapicon_provenance`` (the note, the source file, its step; a shipped source keeps its
own when no --note is given) and ``fmapicon_defaults`` (the protocol values validated for
these weights on held-out sequences, e.g. ``--default pixels_weight=0.85``: evaluation uses
them unless its flags say otherwise), and writes src/fmapicon/weights/NAME.safetensors
atomically. The tensors of a float16 source pass through unchanged.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save

from fmapicon.core.checkpoint import DEFAULTS_KEY, weights_file
from fmapicon.runtime import atomic_write, json_text

LIMIT_BYTES = 10 * 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("name")
    parser.add_argument("--note", default=None, help="how the weights were made (needed unless the source has one)")
    parser.add_argument("--default", action="append", default=[], metavar="KEY=VALUE",
                        help="a protocol value validated for these weights (pixels_weight); repeatable")
    args = parser.parse_args()
    source = weights_file(args.source)
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    tensors = {key: value.half() if value.is_floating_point() else value for key, value in tensors.items()}
    if args.note is not None:  # a source that was shipped before keeps where it came from
        origin = json.loads(metadata.get("fmapicon_provenance") or "{}")
        provenance = {"note": args.note, "source": origin.get("source", source.name),
                      "step": origin.get("step", metadata.get("step"))}
        metadata["fmapicon_provenance"] = json_text(provenance, indent=None).strip()
    elif "fmapicon_provenance" not in metadata:
        raise SystemExit(f"{source} has no provenance: say how it was made with --note")
    if args.default:
        defaults = {key: float(value) for key, _, value in (item.partition("=") for item in args.default)}
        metadata[DEFAULTS_KEY] = json_text(defaults, indent=None).strip()
    target = Path(__file__).resolve().parents[1] / "src" / "fmapicon" / "weights" / f"{args.name}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    data = save(tensors, metadata=metadata)
    if len(data) > LIMIT_BYTES:
        raise SystemExit(f"{args.name}: {len(data)} bytes is over the 10 MB limit for the repository")
    with atomic_write(target) as out:
        out.write(data)
    print(f"wrote {target} ({target.stat().st_size / 2**20:.1f} MiB, step {metadata.get('step')})")


if __name__ == "__main__":
    main()
