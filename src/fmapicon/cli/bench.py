"""``fmapicon bench NAME``: the benchmarks of ``fmapicon.bench`` (one module each)."""

from __future__ import annotations

import importlib
import pkgutil

from fmapicon.cli._types import plain_text


def register(subparsers) -> None:
    import fmapicon.bench as bench_package

    parser = subparsers.add_parser(
        "bench",
        help="benchmarks: print a table, write JSON (loss, data, train, match, ...)",
        description="Benchmarks. Each prints a table and writes JSON with --json PATH. "
        "Timings on shared machines are noisy: compare ratios measured in the same run.",
    )
    names = sorted(m.name for m in pkgutil.iter_modules(bench_package.__path__) if not m.name.startswith("_"))
    benches = parser.add_subparsers(dest="bench", metavar="NAME")
    for name in names:
        module = importlib.import_module(f"fmapicon.bench.{name}")
        sub = benches.add_parser(name, help=module.HELP, description=plain_text(module.__doc__))
        sub.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
        module.add_arguments(sub)
        sub.set_defaults(run=module.main)
    parser.set_defaults(run=lambda args: parser.print_help() or 2)
