"""The ``fmapicon`` command.

Every module in this package is one subcommand: it defines ``register(subparsers)``,
which adds its parser and sets ``run=<function(args) -> int>`` as a default. Modules
here only parse and print; the work lives in the library modules they call. They
import nothing heavy at module level, so ``fmapicon --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from fmapicon import __version__
from fmapicon.errors import UserError


def _subcommand_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmapicon",
        description="Feature Map Inverse Consistency: learn dense features from video, "
        "propagate masks, register images.",
    )
    parser.add_argument("--version", action="version", version=f"fmapicon {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _subcommand_modules():
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # OpenMP's default spin-waiting makes the many small kernels of the tiled objective up to
    # 5x slower on a busy machine (measured: fmapicon bench loss --omp-wait-policy inherit);
    # it must be set before torch loads, so the command sets it unless the user has.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except (UserError, FileNotFoundError, NotADirectoryError, PermissionError) as error:
        if os.environ.get("FMAPICON_DEBUG"):
            raise
        print(f"fmapicon {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fmapicon {args.command}: interrupted", file=sys.stderr)
        return 130
