"""Data: training pairs from video, frame folders or synthetic scenes; DAVIS and flow files.

The names most used from outside are reachable here, loaded on first use (PEP 562), so
that ``fmapicon.data.davis`` and the command line's help stay free of torch:
``FramePairs`` (``data.pairs``), ``read_video_pair``, ``natural_key``, ``natural_sorted``,
``SkippedFileWarning`` (``data.sources``).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "FramePairs": "fmapicon.data.pairs",
    "Pair": "fmapicon.data.pairs",
    "parse_synth": "fmapicon.data.pairs",
    "read_video_pair": "fmapicon.data.sources",
    "natural_key": "fmapicon.data.sources",
    "natural_sorted": "fmapicon.data.sources",
    "SkippedFileWarning": "fmapicon.data.sources",
    "PairReadError": "fmapicon.data.sources",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'fmapicon.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)
