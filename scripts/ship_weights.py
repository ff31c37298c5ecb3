"""Write a trained weights file into the package as float16, with its provenance.

    python scripts/ship_weights.py RUN_OR_FILE NAME --note "how it was made"

Reads RUN_OR_FILE (a run folder or a .safetensors file of `fmapicon train`), converts the
floating-point tensors to float16 (about half the size; `fmapicon.load` returns float32),
keeps the run config in the metadata and adds ``fmapicon_provenance`` (the note, the
source file, its step), and writes src/fmapicon/weights/NAME.safetensors atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save

from fmapicon.core.checkpoint import weights_file
from fmapicon.runtime import atomic_write, json_text

LIMIT_BYTES = 10 * 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("name")
    parser.add_argument("--note", required=True)
    args = parser.parse_args()
    source = weights_file(args.source)
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    tensors = {key: value.half() if value.is_floating_point() else value for key, value in tensors.items()}
    metadata["fmapicon_provenance"] = json_text({"note": args.note, "source": source.name,
                                                 "step": metadata.get("step")}, indent=None).strip()
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
