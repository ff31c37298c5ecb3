"""File names as the file system gives them.

- The listing rule: every folder the project lists (training's scan, DAVIS frames and
  annotations, sequence folders, predictions, output folders) shows only
  ``visible_entries``. A name that starts with ``.`` is hidden: macOS companions (``._00000.jpg``,
  ``.DS_Store``), editor and sync files, and this project's own staging folders. The
  official DAVIS toolkit lists with ``glob``, which skips the same names.
- Names are whatever bytes the file system holds. Python gives bytes that are not UTF-8 as
  lone surrogates (``os.fsdecode``); ``display_path`` renders any name in printable text
  (``s\\xe9q``) for messages and logs, and ``fmapicon.runtime.atomic_write`` writes a
  name back as its bytes into the text files the project writes (CSVs), so that such names
  round-trip.
"""

from __future__ import annotations

import codecs
import os
from pathlib import Path

#: an error handler for text streams (``stream.reconfigure(errors=DISPLAY_ERRORS)``): a name's
#: non-UTF-8 byte prints as ``\xNN`` (as ``display_path``), anything else unencodable as an escape
DISPLAY_ERRORS = "fmapicon.display"


def _escape_unencodable(error):
    if not isinstance(error, UnicodeEncodeError):
        raise error
    chunk = error.object[error.start:error.end]
    text = "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                   else c.encode("ascii", "backslashreplace").decode("ascii") for c in chunk)
    return text, error.end


codecs.register_error(DISPLAY_ERRORS, _escape_unencodable)


def is_hidden(name) -> bool:
    """True for a name (or a path's last part) that starts with ``.``."""
    name = name.name if isinstance(name, os.PathLike) else str(name)
    return name.startswith(".")


def visible_entries(folder) -> list[os.DirEntry]:
    """The entries of ``folder`` that are not hidden (``is_hidden``), in no set order.
    Raises ``OSError`` as ``os.scandir`` does."""
    with os.scandir(folder) as entries:
        return [entry for entry in entries if not is_hidden(entry.name)]


def visible_files(folder, suffixes=None) -> list[Path]:
    """The files in ``folder`` that are not hidden, with one of ``suffixes`` (lower case,
    e.g. ``(".jpg", ".png")``; any case on disk) when given; [] when ``folder`` is no folder.
    Sorted by name; callers that need frame order sort with ``natural_key``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [Path(entry.path) for entry in visible_entries(folder)
             if entry.is_file() and (suffixes is None or os.path.splitext(entry.name)[1].lower() in suffixes)]
    return sorted(found)


def visible_folders(folder) -> list[Path]:
    """The sub-folders of ``folder`` that are not hidden, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(Path(entry.path) for entry in visible_entries(folder) if entry.is_dir())


def display_path(path) -> str:
    """``path`` (a str, bytes or path) as printable text: bytes that are not UTF-8 become
    ``\\xNN`` escapes, so a message or a log line never fails on a name."""
    raw = os.fsencode(path) if not isinstance(path, bytes) else path
    return raw.decode("utf-8", errors="backslashreplace")
