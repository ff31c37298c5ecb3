"""fmapicon: Feature Map Inverse Consistency.

Learn dense per-pixel features from unlabeled video by asking that the soft
correspondence A -> B -> A brings every pixel home,

    L = log P[Phi^AB(Phi^BA(x)) = x],

under an equivariance augmentation, and use them to propagate object masks through
videos and to register images.

``import fmapicon`` is cheap: torch and everything heavy load on first use of the
names below (PEP 562 lazy attributes).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "log_p": "fmapicon.core.objective",
    "log_p_dense": "fmapicon.core.objective",
    "load": "fmapicon.core.checkpoint",
    "build_network": "fmapicon.core.networks",
    "track": "fmapicon.evaluation.track",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'fmapicon' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
