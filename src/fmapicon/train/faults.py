"""How a run ends early: stop requests from SIGINT / SIGTERM, ``TrainingInterrupted`` (saved,
resumable) and ``TrainingDiverged`` (too many non-finite steps in a row).

* SIGINT / SIGTERM: the current step finishes, a checkpoint is saved and
  ``TrainingInterrupted`` is raised (the command line exits 130 / 143); a second
  signal stops at once.
* A non-finite loss (or feature map) or gradient norm skips the step: no optimizer
  update, the gradients are dropped (under ``grad_accumulation="original"`` this clears
  the accumulated sum), the step still counts and is logged. After ``max_bad_steps`` in a
  row, ``TrainingDiverged`` is raised and the last checkpoint (the last good one) stays.
  Under fp16, a non-finite gradient is the gradient scaler's business (it lowers its
  scale and skips); those are counted as ``amp_skipped_steps``.
* An unwritable output folder or less than ``MIN_FREE_BYTES`` free (or four
  checkpoints' worth) is a ``UserError`` before any training.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after saving a checkpoint at ``step``."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        self.signum, self.step, self.run_dir = signum, step, run_dir
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: saved a checkpoint at step {step} in {run_dir}; "
                         f"continue with: fmapicon train --resume {run_dir}")

    @property
    def exit_status(self) -> int:
        """The shell's convention: 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


class TrainingDiverged(RuntimeError):
    """``max_bad_steps`` non-finite steps in a row; the last saved checkpoint is kept."""


class StopRequests:
    """SIGINT / SIGTERM ask the loop to stop after the current step (it then saves); a
    second signal stops at once. Installed only in the main thread."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:  # the second signal: no more waiting
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
