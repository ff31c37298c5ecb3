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
import warnings

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


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """One clean line per warning on stderr (no Python source path or source line)."""
    text = " ".join(str(message).split())
    try:
        from tqdm import tqdm

        tqdm.write(f"fmapicon: warning: {text}", file=file or sys.stderr)  # above any progress bar
    except ImportError:
        print(f"fmapicon: warning: {text}", file=file or sys.stderr)


def _unknown_options(parser: argparse.ArgumentParser, args, unknown: list[str]) -> None:
    """Exit (status 2) naming the unknown arguments and, for a mistyped option, the closest
    option of the subcommand (``--stesp`` -> ``--steps``)."""
    import difflib

    target = parser
    command = getattr(args, "command", None)
    if command:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) and command in action.choices:
                target = action.choices[command]
    options = [o for action in target._actions for o in action.option_strings if o.startswith("--")]
    hints = []
    for word in unknown:
        if word.startswith("-"):
            close = difflib.get_close_matches(word.split("=", 1)[0], options, n=1, cutoff=0.6)
            if close:
                hints.append(f"{word}: did you mean {close[0]}?")
    message = f"unrecognized arguments: {' '.join(unknown)}"
    if hints:
        message += " (" + "; ".join(hints) + ")"
    target.error(message)


def main(argv: list[str] | None = None) -> int:
    # OpenMP's default spin-waiting makes the many small kernels of the tiled objective up to
    # 5x slower on a busy machine (measured: fmapicon bench loss --omp-wait-policy inherit);
    # it must be set before torch loads, so the command sets it unless the user has.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _printable_streams()
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # here, where a closed stdout can still end quietly (also after --help)
    except BrokenPipeError:
        return _stdout_closed()


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _unknown_options(parser, args, unknown)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.run(args) or 0)
    except BrokenPipeError:
        raise
    except (UserError, OSError) as error:  # a missing file, a full disk, a folder without permission
        if os.environ.get("FMAPICON_DEBUG"):
            raise
        print(f"fmapicon {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fmapicon {args.command}: interrupted", file=sys.stderr)
        return 130


def _printable_streams() -> None:
    """stdout and stderr print any file name: a non-UTF-8 byte as ``\\xNN``, never an error."""
    from fmapicon.paths import DISPLAY_ERRORS

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors=DISPLAY_ERRORS)
        except (AttributeError, ValueError, OSError):  # not a text stream we may reconfigure
            pass


def _stdout_closed() -> int:
    """The reader of stdout went away (``fmapicon ... | head``): end quietly, as a command
    killed by SIGPIPE does (status 141), without Python's complaint when it flushes at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141
