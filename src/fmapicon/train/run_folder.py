"""The run folder: file names, checks before training (writable, free space, resume or
force), the saved config, and the metrics log (``metrics.jsonl`` plus TensorBoard).

``config.json``
    the resolved ``TrainConfig`` plus ``input_scale`` (``FramePairs.input_scale``: the
    scale at which evaluation shows frames to the model, that of the training crops),
    ``network`` (the ``NetworkConfig``), ``stride``, ``world_size``, ``fmapicon_version``,
    ``git_commit`` (when known), ``torch_version``.
``metrics.jsonl``
    one JSON object per logged step (every ``log_every`` steps, the last step always):
    ``step`` (steps done, from 1), ``loss``, ``log_p`` (the exact objective, eps = 0, on
    the step's batch), ``log_p_shuffled`` (the same features with B taken from another
    pair of the batch: B rolled by one; ``log_p ~ log_p_shuffled`` means the features
    are a positional code, attempt 0 of the writeup; null with a per-process batch of 1),
    ``lambda``, ``lr``, ``grad_norm`` (before clipping), ``pairs_per_s`` (since the
    previous line), ``bad_steps``, ``bad_steps_in_row``, ``epoch``, ``elapsed_s``; and
    ``jf_mean`` on evaluation steps. A skipped step writes a line with ``"event":
    "non_finite"``. Non-finite numbers are written as null.
``tensorboard/``
    the same scalars as TensorBoard events, when ``tensorboard`` is installed.
``checkpoints/last.safetensors``
    the network's weights and buffers, with the resolved config in the safetensors
    metadata, so the file alone loads (``fmapicon.load``). PixelCenter's running mean in
    it is recomputed at the saved weights on 128 fixed training frames (metadata
    ``pixel_center_calibration``; see ``networks.calibrate_pixel_center``): the trailing
    momentum mean left a positional residual that swamped eval-mode features.
    ``checkpoints/best.safetensors``: the best ``jf_mean`` so far (evaluated calibrated).
``checkpoints/state.pt``
    everything ``--resume`` needs: weights, optimizer, gradient scaler, step, data
    position (epoch, batches consumed), counters, RNG states of torch / numpy / python.
    It holds the weights too, so that one atomic rename makes a consistent checkpoint.
    Read back with ``torch.load(weights_only=True)``.

Every file is written through a temporary file and renamed (``runtime.atomic_write``):
a kill during a save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

from fmapicon.errors import UserError
from fmapicon.runtime import json_text, remove_entries, strict_json_value
from fmapicon.train.config import REMOVED_OPTIONS, TrainConfig


# disk space needed before training starts (more when four checkpoints need more)
MIN_FREE_BYTES = 64 * 2**20

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
LAST_WEIGHTS = "last.safetensors"
BEST_WEIGHTS = "best.safetensors"
STATE_FILE = "state.pt"
SNAPSHOT_WEIGHTS = "step-{step:06d}.safetensors"  # kept every --snapshot-every steps
CALIBRATION_FRAMES = 128  # frames that PixelCenter's mean is recomputed on for each weights file
_RUN_ENTRIES = (CONFIG_FILE, METRICS_FILE, TENSORBOARD_DIR, CHECKPOINT_DIR)


def saved_config(run_dir) -> TrainConfig:
    """The TrainConfig a run folder was started with (from its config.json)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder: {CONFIG_FILE} not found; give the --out of an "
                        "earlier `fmapicon train`")
    saved = json.loads(path.read_text())
    names = {f.name for f in dataclasses.fields(TrainConfig)} | set(REMOVED_OPTIONS)  # removed: refused unless off
    return TrainConfig.from_mapping({k: v for k, v in saved.items() if k in names})


def prepare_run_folder(run: Path, *, resume: bool, force: bool) -> None:
    """Check (and for a new run, empty with ``force``) the run folder before training."""
    if run.exists() and not run.is_dir():
        raise UserError(f"--out {run} is a file; give a folder for the run")
    if resume and not (run / CHECKPOINT_DIR / STATE_FILE).is_file():
        raise UserError(f"cannot resume {run}: {CHECKPOINT_DIR}/{STATE_FILE} not found (was it saved?); "
                        "start a new run with --out")
    if not resume and run.is_dir() and any(run.iterdir()):
        if not force:
            raise UserError(f"--out {run} exists and is not empty; choose a new folder, continue it with "
                            f"--resume {run}, or replace its run with --force")
        remove_entries(run, _RUN_ENTRIES)  # what a run writes, nothing else the user keeps there
    check_writable(run)
    check_free_space(run, MIN_FREE_BYTES)




def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and write a probe file into it, or raise ``UserError``."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as probe:
            probe.write(b"probe")
    except OSError as error:
        raise UserError(f"cannot write the run folder {folder}: {error}; choose a writable --out") from error


def check_free_space(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UserError(f"only {free / 2**20:.0f} MiB free on the disk of {folder}, training needs at least "
                        f"{need / 2**20:.0f} MiB for its checkpoints and metrics; free some space or choose "
                        "another --out")


def git_commit() -> str | None:
    """The source checkout's commit, when the package runs from a git work tree."""
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class MetricsLog:
    """metrics.jsonl (one JSON object per line, flushed) and TensorBoard scalars when available."""

    def __init__(self, run: Path, resume_step: int | None):
        self.path = run / METRICS_FILE
        if resume_step is not None:
            _truncate_metrics(self.path, resume_step)
        self.file = open(self.path, "a", encoding="utf-8")
        self.tensorboard = _tensorboard_writer(run, resume_step)

    def write(self, record: dict) -> None:
        record = strict_json_value(record)  # JSON has no NaN or infinity: null
        self.file.write(json_text(record, indent=None))
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (a run killed between saves)."""
    from fmapicon.runtime import atomic_write

    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    with atomic_write(path, "w") as handle:
        handle.write("".join(line + "\n" for line in kept))


def _tensorboard_writer(run: Path, resume_step: int | None):
    from fmapicon.runtime import has_module

    if not has_module("tensorboard"):
        return None
    from torch.utils.tensorboard import SummaryWriter

    purge = None if resume_step is None else resume_step + 1
    return SummaryWriter(str(run / TENSORBOARD_DIR), purge_step=purge)
