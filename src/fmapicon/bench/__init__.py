"""Benchmarks, run on demand (``fmapicon bench NAME``), never as timing assertions in tests.

Each module here is one benchmark and defines ``HELP`` (one line), a docstring,
``add_arguments(parser)`` and ``main(args) -> int``; ``--json PATH`` is added for all.
Report figures as ratios against a baseline measured in the same run: the machines are
shared and noisy. The helpers below print the table and write the JSON the same way
for every benchmark.
"""

from __future__ import annotations

import time
from pathlib import Path

from fmapicon.runtime import machine_info


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain aligned text table; floats get 4 significant digits, None prints as '-'."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def report(name: str, rows: list[dict], json_path: str | None, notes: list[str] | None = None,
           extra: dict | None = None, columns: list[str] | None = None) -> dict:
    """Print the table (and notes) and, when asked, write ``{benchmark, machine, rows, ...}``."""
    print(format_table(rows, columns))
    for note in notes or []:
        print(f"note: {note}")
    payload = {"benchmark": name, "machine": machine_info(), "rows": rows, "notes": notes or []}
    payload.update(extra or {})
    if json_path:
        from fmapicon.runtime import write_json

        path = write_json(Path(json_path), payload)
        print(f"wrote {path}")
    return payload


def timed(fn, repeat: int = 3, warmup: int = 1) -> float:
    """Best-of-``repeat`` wall time of ``fn()`` in seconds (synchronizing CUDA if used)."""
    import torch

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best
