"""Named random streams (seeded from integer keys) and the global RNG states a resume restores.

Reproducibility: the augmentation draws of step s on rank r come from a generator seeded
with (seed, r, s), and each epoch's data order from (seed, epoch); so a resumed run
repeats the uninterrupted run's next steps (bitwise on CPU, with the same thread count
and a dataset whose pairs depend only on its seed, epoch and index).
"""

from __future__ import annotations

def stream_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed for the random stream named by integer ``keys``."""
    import numpy as np

    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


AUGMENT_STREAM, DATA_STREAM = 1, 2


def rng_state() -> dict:
    """The global RNG states (torch CPU and CUDA, numpy, python) as weights_only-loadable data."""
    import random

    import numpy as np
    import torch

    numpy_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                  "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "has_gauss": saved["has_gauss"], "gauss": saved["gauss"],
                         "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]}})
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
