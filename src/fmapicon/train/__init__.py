"""Training: the loop, the run folder, resume, faults and data-parallel training.

``train(config, out_dir)`` maximizes the FeatureMapICON objective over pairs of frames
(A, B) of one video (``B x 3 x S x S`` in [0, 1]):

    log_p = mean_i log( sum_j softmax_j(a1_i . b2_j) softmax_i(a3_i . b4_j) + eps )
    loss  = -mean_batch log_p

where a1, b2, a3, b4 (``B x C x S x S``) are the network's feature maps under four
independent draws of the equivariant augmentation (``fmapicon.core.augment.four_draws``) and
eps = ``log_eps`` (the original's 1e-4 floor). One step = one global batch = one
optimizer update (unless skipped, see faults).

The run folder
--------------
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

Reproducibility: the augmentation draws of step s on rank r come from a generator seeded
with (seed, r, s), and each epoch's data order from (seed, epoch); so a resumed run
repeats the uninterrupted run's next steps (bitwise on CPU, with the same thread count
and a dataset whose pairs depend only on its seed, epoch and index).

Faults
------
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

Data-parallel training (``torchrun --nproc_per_node=K -m fmapicon train ...``)
--------------------------------------------------------------------------------
When ``WORLD_SIZE`` > 1 the process group is initialized from the environment (gloo on
CPU, nccl on CUDA, device ``cuda:LOCAL_RANK``), ``batch`` is the global batch (each rank
takes ``batch / world`` pairs of every global batch, so the global batches are the same
as in a one-process run), PixelCenter centres over the global batch, and
DistributedDataParallel wraps a module whose one forward runs the four draws. On CUDA,
BatchNorm becomes SyncBatchNorm; on CPU (gloo), where SyncBatchNorm is not supported,
batch norm uses per-rank statistics (and the saved running statistics are rank 0's).
Only rank 0 writes the run folder and shows progress; every rank reads
``checkpoints/state.pt`` on ``--resume``, so the run folder must be on a file system all
nodes share. torchrun forwards SIGTERM / SIGINT to the ranks, which finish the step and
save (torchrun itself then exits non-zero with its own message).

On a cluster, one torchrun per node with a rendezvous on the first node, e.g. 2 nodes
of 8 GPUs under SLURM (one task per node; ``--signal=TERM@120`` asks SLURM for a SIGTERM
two minutes before the time limit, enough to save)::

    srun --nodes=2 --ntasks-per-node=1 torchrun --nnodes=2 --nproc_per_node=8 \
        --rdzv-id=$SLURM_JOB_ID --rdzv-backend=c10d \
        --rdzv-endpoint=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1):29500 \
        -m fmapicon train --data /shared/videos --out /shared/runs/r1 --batch 64

Deviations from the original code
---------------------------------
* Gradients are cleared before each step (``grad_accumulation="off"``). The original
  never called ``zero_grad``, so every step clipped and applied the running *sum* of all
  past gradients; ``grad_accumulation="original"`` reproduces that.
* Affine swaps of T and T^-1 are per sample (see ``fmapicon.core.augment``).

From Python::

    from fmapicon.train import TrainConfig, train
    run = train(TrainConfig(size=64, batch=8, steps=200), "runs/small")
    model = fmapicon.load(run)          # unit features, eval mode
    train(None, run, resume=True)       # after an interruption: go on to the same total

This module imports only the standard library at load time (torch is imported inside
the functions), so that the command line can read ``TrainConfig`` for its ``--help``
without loading torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fmapicon.errors import UserError
from fmapicon.runtime import remove_entries

NETS = ("short", "tall", "taller", "resnet-s4", "resnet-s8")  # = networks.NETS (kept torch-free here)
RECIPES = ("reference", "original")
AUGMENTATIONS = ("none", "affine", "roll", "roll+affine")
OPTIMIZERS = ("rmsprop", "adam", "adamw")
AMP_MODES = ("off", "bf16", "fp16")
GRAD_ACCUMULATION = ("off", "original")
CROPS = ("center", "random")

# keys that --resume may change; everything else must stay as the run was started
RESUMABLE = ("steps", "device", "workers", "minutes")

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

_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


# --------------------------------------------------------------------------- the config


# The fields in which the two recipes differ; every other default is shared. The dataclass
# defaults are the reference recipe's (fmapicon.load("reference") was trained with them).
RECIPE_VALUES = {
    "reference": dict(net="resnet-s4", size=128, batch=16, max_gap=10, crop="random", crop_min=0.4, crop_max=0.7,
                      lambda_init=4.0, optim="adam", steps=4000),
    "original": dict(net="short", size=120, batch=64, max_gap=30, crop="center", crop_min=0.5, crop_max=1.0,
                     lambda_init=12.0, optim="rmsprop", steps=20000),
}
_REFERENCE = RECIPE_VALUES["reference"]


def _knob(default, help: str, *, choices=None, minimum=None, above=None):
    """A TrainConfig field with its help text and value check (read by the CLI too)."""
    kind = "list" if isinstance(default, list) else "optional_str" if default is None else type(default).__name__
    metadata = {"help": help, "kind": kind, "choices": choices, "minimum": minimum, "above": above}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Every knob of a training run. Defaults are the reference recipe's (``recipe``); the
    original code's final recipe is ``TrainConfig.for_recipe("original")``."""

    recipe: str = _knob("reference", "the defaults the other options start from: reference (the shipped model's "
                        "recipe: stride-4 ResNet, 128 x 128 random crops near half the frame's resolution, "
                        "Adam, lambda 4; learns on one CPU) or original (the original code's: short U-Net, 120 x "
                        "120 centre crops, batch 64, RMSprop, lambda 12, pairs up to 30 frames apart)",
                        choices=RECIPES)
    data: list[str] = _knob(["synth"], "training sources: video files (mp4, avi, mkv, webm, mov), frame folders "
                       "(DAVIS JPEGImages layout or any folder of images), folders mixing them, or 'synth' "
                       "(synthetic scenes generated on the fly)")
    net: str = _knob(_REFERENCE["net"], "backbone: resnet-s4 / resnet-s8 (a ResNet-18-style "
                     "encoder, features at stride 4 / 8: the loss sees 16 / 64 times fewer pixels per crop), or a "
                     "U-Net at stride 1: short (4 levels, the original's final choice), tall (5), taller (7)", choices=NETS)
    channels: int = _knob(64, "feature channels C per pixel; the loss costs linearly more per channel", minimum=1)
    size: int = _knob(_REFERENCE["size"], "training frames are S x S pixels; the loss costs O(S^4) per pair, so halving S "
                      "makes it about 16x cheaper but sees less context", minimum=8)
    batch: int = _knob(_REFERENCE["batch"], "global batch: pairs per step, split evenly over processes; PixelCenter's mean is "
                       "over this batch, so small batches make it noisy", minimum=1)
    max_gap: int = _knob(_REFERENCE["max_gap"], "B is 1..max_gap frames after A: larger gaps teach larger motions, but pairs "
                         "lose correspondence", minimum=1)
    crop: str = _knob(_REFERENCE["crop"], "center: the largest centred square of each frame, as the original (evaluation "
                      "runs at the recorded scale); random: a random square of --crop-min to --crop-max of the short "
                      "side, shared by A and B (more scales, but no single training scale)", choices=CROPS)
    crop_min: float = _knob(_REFERENCE["crop_min"], "with --crop random: the smallest crop side as a fraction of the frame's short "
                            "side (0.1 of 480p frames at --size 48 trains near their own resolution)", above=0.0)
    crop_max: float = _knob(_REFERENCE["crop_max"], "with --crop random: the largest crop side as a fraction of the short side",
                            above=0.0)
    aug: str = _knob("roll+affine", "equivariant augmentation: none (attempt 0: the net collapses to a "
                     "positional code), affine (attempt 1), roll, roll+affine (the final recipe)",
                     choices=AUGMENTATIONS)
    center: bool = _knob(True, "PixelCenter (attempt 2): subtract the per-location batch mean of the features")
    lambda_init: float = _knob(_REFERENCE["lambda_init"], "initial lambda of NormScale: features are unit vectors times lambda, "
                               "logits reach lambda^2; larger values give sharper matches", above=0.0)
    log_eps: float = _knob(1e-4, "eps in log(sum + eps) of the loss: the original's 1e-4 floors an occluded "
                           "pixel's term at about -9.2 (robust); 0 trains the exact log_p", minimum=0.0)
    optim: str = _knob(_REFERENCE["optim"], "optimizer: rmsprop (the original's: alpha 0.99, eps 1e-8), adam, adamw "
                       "(weight decay 0.01)", choices=OPTIMIZERS)
    lr: float = _knob(1e-3, "learning rate (constant, no schedule, as the original)", above=0.0)
    clip: float = _knob(20.0, "clip the L2 norm of all gradients together to this; 0 turns clipping off",
                        minimum=0.0)
    steps: int = _knob(_REFERENCE["steps"], "total steps (with --resume: the new total); the original ran until stopped",
                       minimum=1)
    amp: str = _knob("off", "mixed precision for the network: off (float32), bf16 (CPU or CUDA), fp16 (CUDA, "
                     "with a gradient scaler); the loss always reduces in float32", choices=AMP_MODES)
    workers: int = _knob(2, "DataLoader worker processes per training process; 0 loads in the main process "
                         "(slower, but no extra processes); video decoding wants a few", minimum=0)
    seed: int = _knob(0, "seed of the data order, the augmentation draws and the initial weights", minimum=0)
    device: str = _knob("auto", "auto (CUDA when available), cpu, cuda or cuda:N; under torchrun each rank "
                        "uses cuda:LOCAL_RANK")
    log_every: int = _knob(10, "write a metrics line every N steps (each costs two extra loss evaluations "
                           "without gradient)", minimum=1)
    save_every: int = _knob(500, "save a checkpoint every N steps (also at the end and on SIGINT/SIGTERM)",
                            minimum=1)
    grad_accumulation: str = _knob("off", "off: clear gradients every step (this package's default, a "
                                   "deviation); original: never clear them, as the original code, so each "
                                   "step clips and applies the running sum of past gradients (which "
                                   "each clip rescales in place)",
                                   choices=GRAD_ACCUMULATION)
    max_bad_steps: int = _knob(10, "stop after this many non-finite steps in a row (each is skipped "
                               "without an update); the last checkpoint is kept", minimum=1)
    eval_every: int = _knob(0, "every N steps, run label propagation on --davis and log jf_mean (keeps "
                            "checkpoints/best.safetensors); 0 = never", minimum=0)
    davis: str | None = _knob(None, "DAVIS root for --eval-every (JPEGImages/480p, Annotations/480p, ImageSets)")
    snapshot_every: int = _knob(0, "also keep the weights of every N-th step as checkpoints/step-NNNNNN."
                                "safetensors (to evaluate along a run); 0 = never", minimum=0)
    minutes: float = _knob(0.0, "stop (with a checkpoint, like the end of the run) after this many minutes "
                           "of training; 0 = no limit, --steps decides", minimum=0.0)

    def validate(self) -> TrainConfig:
        """Raise ``UserError`` listing every bad value; return self."""
        problems = [p for f in dataclasses.fields(self) if (p := check_value(f.name, getattr(self, f.name)))]
        if not self.crop_min <= self.crop_max <= 1.0:
            problems.append(f"crop_min <= crop_max <= 1 is needed, got crop_min={self.crop_min}, "
                            f"crop_max={self.crop_max}")
        if self.eval_every and not self.davis:
            problems.append("eval_every > 0 needs davis (a DAVIS root to evaluate on)")
        if problems:
            raise UserError("bad training configuration:\n  " + "\n  ".join(problems))
        return self

    @classmethod
    def for_recipe(cls, name: str) -> TrainConfig:
        """The defaults of recipe ``name`` (``RECIPES``): ``RECIPE_VALUES[name]`` over the shared ones."""
        if name not in RECIPE_VALUES:
            raise UserError(f"unknown recipe {name!r}: expected one of {', '.join(RECIPES)}")
        return dataclasses.replace(cls(), recipe=name, **RECIPE_VALUES[name])

    @classmethod
    def from_mapping(cls, mapping: dict, base: TrainConfig | None = None) -> TrainConfig:
        """``base`` updated with ``mapping`` (keys with - or _). Without a base: the defaults
        of the mapping's ``recipe`` (default reference), so ``{"recipe": "original"}`` alone
        is the original's recipe.

        An unknown key is a ``UserError`` that lists the valid ones; values are checked.
        """
        values = {str(key).replace("-", "_"): value for key, value in mapping.items()}
        if base is None:
            base = cls.for_recipe(values.get("recipe", "reference"))
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise UserError(f"unknown training option(s) {', '.join(unknown)}; valid keys: {', '.join(names)}")
        values = {key: _coerce(key, value) for key, value in values.items()}
        return dataclasses.replace(base or cls(), **values).validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def config_fields() -> dict:
    """name -> metadata (help, kind, choices, minimum, above) of every TrainConfig field."""
    return {f.name: dict(f.metadata, default=_default(f)) for f in dataclasses.fields(TrainConfig)}


def _default(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _coerce(name: str, value):
    """Lenient conversions for values read from files: an int where a float is expected,
    one string where a list is expected."""
    kind = _field(name).metadata["kind"]
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind == "list" and isinstance(value, str):
        return [value]
    return value


def _field(name: str):
    return next(f for f in dataclasses.fields(TrainConfig) if f.name == name)


def check_value(name: str, value) -> str | None:
    """None when ``value`` suits the field ``name``, else a message saying why not."""
    meta = _field(name).metadata
    kind = meta["kind"]
    if not _has_kind(value, kind):
        return f"{name}: expected {_KIND_WORDS[kind]}, got {value!r}"
    if meta["choices"] and value not in meta["choices"]:
        return f"{name}: expected one of {', '.join(meta['choices'])}, got {value!r}"
    if meta["minimum"] is not None and value < meta["minimum"]:
        return f"{name}: expected a value >= {meta['minimum']}, got {value!r}"
    if meta["above"] is not None and value <= meta["above"]:
        return f"{name}: expected a value > {meta['above']}, got {value!r}"
    if name == "device" and not _DEVICE_PATTERN.match(value):
        return f"device: expected auto, cpu, cuda or cuda:N, got {value!r}"
    return None


_KIND_WORDS = {"int": "an integer", "float": "a finite number", "str": "a string", "bool": "true or false",
               "list": "a non-empty list of strings", "optional_str": "a string or nothing"}


def _has_kind(value, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "list":
        return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)
    if kind == "optional_str":
        return value is None or isinstance(value, str)
    return isinstance(value, str)


def load_config_file(path) -> dict:
    """The mapping in a ``.toml`` or ``.json`` config file (keys as in TrainConfig)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found; expected a .toml or .json file of training options")
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        return _parse_toml(path, text)
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"config file {path} is not valid JSON ({error}); use .toml for TOML files") from error
    if not isinstance(mapping, dict):
        raise UserError(f"config file {path} must hold one object of options, got {type(mapping).__name__}")
    return mapping


def _parse_toml(path: Path, text: str) -> dict:
    try:
        import tomllib
    except ImportError as error:  # Python 3.10
        raise UserError(f"reading {path} needs tomllib (Python >= 3.11); on Python 3.10 write the same "
                        "options as a .json file") from error
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"config file {path} is not valid TOML: {error}") from error


def saved_config(run_dir) -> TrainConfig:
    """The TrainConfig a run folder was started with (from its config.json)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder: {CONFIG_FILE} not found; give the --out of an "
                        "earlier `fmapicon train`")
    saved = json.loads(path.read_text())
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig.from_mapping({k: v for k, v in saved.items() if k in names})


def _check_resumable(config: TrainConfig, saved: TrainConfig) -> None:
    changed = [f.name for f in dataclasses.fields(TrainConfig)
               if f.name not in RESUMABLE and getattr(config, f.name) != getattr(saved, f.name)]
    if changed:
        details = ", ".join(f"{n}: {getattr(saved, n)!r} -> {getattr(config, n)!r}" for n in changed)
        raise UserError(f"--resume continues a run with its own config; only {', '.join(RESUMABLE)} may "
                        f"change, but these differ: {details}. Start a new --out to change them.")


# --------------------------------------------------------------------------- outcomes


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


# --------------------------------------------------------------------------- run folder


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


def _git_commit() -> str | None:
    """The source checkout's commit, when the package runs from a git work tree."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _json_number(value):
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """metrics.jsonl (one JSON object per line, flushed) and TensorBoard scalars when available."""

    def __init__(self, run: Path, resume_step: int | None):
        self.path = run / METRICS_FILE
        if resume_step is not None:
            _truncate_metrics(self.path, resume_step)
        self.file = open(self.path, "a", encoding="utf-8")
        self.tensorboard = _tensorboard_writer(run, resume_step)

    def write(self, record: dict) -> None:
        record = {key: _json_number(value) for key, value in record.items()}
        self.file.write(json.dumps(record) + "\n")
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


# --------------------------------------------------------------------------- processes


@dataclass
class Processes:
    """Where this process stands among the training processes (torchrun's environment)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialized the process group, so we destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_processes(device_name: str):
    """(Processes, torch.device): one process, or DDP from torchrun's WORLD_SIZE / RANK /
    LOCAL_RANK (gloo on CPU, nccl on CUDA)."""
    import torch
    import torch.distributed as dist

    from fmapicon.runtime import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return Processes(), resolve_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


def _close_processes(processes: Processes) -> None:
    import torch.distributed as dist

    if processes.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _barrier(processes: Processes) -> None:
    if processes.distributed:
        import torch.distributed as dist

        dist.barrier()


def _rank_zero_error(processes: Processes, work) -> None:
    """Run ``work`` on rank 0 and raise its UserError on every rank (so none waits forever)."""
    message = None
    if processes.main:
        try:
            work()
        except UserError as error:
            message = str(error)
    if processes.distributed:
        import torch.distributed as dist

        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise UserError(message)


# --------------------------------------------------------------------------- randomness


def stream_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed for the random stream named by integer ``keys``."""
    import numpy as np

    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


_AUGMENT_STREAM, _DATA_STREAM = 1, 2


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


# --------------------------------------------------------------------------- data


class GlobalBatches:
    """The data order: each epoch a permutation seeded by (seed, epoch), cut into global
    batches of ``batch`` indices (the tail that does not fill one is dropped); rank r
    takes the r-th of ``world`` equal slices of each. The position (epoch, batches done)
    is all that resume needs, and the global batches do not depend on the world size.
    """

    def __init__(self, length: int, batch: int, rank: int, world: int, seed: int):
        if length < batch:
            raise UserError(f"the data has {length} pairs, fewer than one batch of {batch}; add data or "
                            "lower --batch")
        self.length, self.batch, self.rank, self.world, self.seed = length, batch, rank, world, seed

    @property
    def per_epoch(self) -> int:
        return self.length // self.batch

    def epoch(self, epoch: int, start: int = 0) -> list:
        """This rank's index lists for batches ``start, start + 1, ...`` of ``epoch``."""
        import torch

        generator = torch.Generator().manual_seed(stream_seed(self.seed, _DATA_STREAM, epoch))
        order = torch.randperm(self.length, generator=generator)[: self.per_epoch * self.batch]
        share = self.batch // self.world
        batches = order.view(self.per_epoch, self.world, share)[start:, self.rank]
        return batches.tolist()


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which finishes its
    step, saves and shuts them down: a terminal's Ctrl-C and torchrun's SIGTERM reach the
    whole process group, and a worker that died of it would fail the step instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _make_dataset(config: TrainConfig):
    from fmapicon.data.pairs import FramePairs

    return FramePairs(config.data, size=config.size, max_gap=config.max_gap, crop=config.crop, seed=config.seed,
                      crop_scale=(config.crop_min, config.crop_max))


def _dataset_length(dataset) -> int:
    try:
        return len(dataset)
    except TypeError as error:
        raise UserError("the training data must be a map-style dataset with a length") from error


class DataStream:
    """Batches ``(A, B)`` (each ``b x 3 x S x S``, b = batch / world) from the position
    (epoch, batches done), forever, one DataLoader per epoch."""

    def __init__(self, dataset, order: GlobalBatches, workers: int, pin_memory: bool, seed: int):
        self.dataset, self.order, self.workers, self.pin_memory, self.seed = dataset, order, workers, pin_memory, seed
        self.epoch, self.position = 0, 0

    def __iter__(self):
        while True:
            yield from self._epoch_batches()
            self.epoch, self.position = self.epoch + 1, 0

    def _epoch_batches(self):
        for batch in self._loader(self.epoch, self.position):
            self.position += 1
            yield batch

    def _loader(self, epoch: int, start: int):
        import torch
        from torch.utils.data import DataLoader

        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        # seeds the workers from (seed, epoch), not from the global RNG, so that a resumed
        # epoch's workers are seeded as the uninterrupted run's were
        generator = torch.Generator().manual_seed(stream_seed(self.seed, _DATA_STREAM, epoch, 1))
        return DataLoader(self.dataset, batch_sampler=self.order.epoch(epoch, start), num_workers=self.workers,
                          pin_memory=self.pin_memory, generator=generator,
                          worker_init_fn=_ignore_stop_signals if self.workers else None)


# --------------------------------------------------------------------------- model


def network_config(config: TrainConfig):
    """The ``NetworkConfig`` of a run: PixelCenter's size is the feature map's (S / stride)."""
    from fmapicon.core.networks import NetworkConfig, feature_size

    side = feature_size(config.size, config.net)
    return NetworkConfig(net=config.net, channels=config.channels, lambda_init=config.lambda_init,
                         center=config.center, size=(side, side))


def _four_draw_module(net, augmentation):
    """A module whose one forward runs the four augmented draws, so that DDP sees one
    forward per backward (defined here to keep this module's import free of torch)."""
    import torch

    from fmapicon.core.augment import four_draws

    class FourDraws(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, a, b, generator):
            return four_draws(self.net, a, b, augmentation, generator=generator)

    return FourDraws()


def _distributed_model(module, processes: Processes, device):
    import torch
    from torch.nn.parallel import DistributedDataParallel

    if not processes.distributed:
        return module
    if device.type == "cuda":
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return DistributedDataParallel(module, device_ids=[device.index])
    return DistributedDataParallel(module)  # gloo: BatchNorm keeps per-rank statistics


def make_optimizer(config: TrainConfig, parameters):
    import torch

    if config.optim == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=config.lr, alpha=0.99, eps=1e-8)
    if config.optim == "adam":
        return torch.optim.Adam(parameters, lr=config.lr)
    return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.01)


def _amp_dtype(config: TrainConfig, device):
    import torch

    if config.amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device (it relies on a gradient scaler); use --amp bf16 on CPU")
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.amp]


# --------------------------------------------------------------------------- signals


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


# --------------------------------------------------------------------------- the loop


@dataclass
class StepResult:
    """What one step produced: the mean loss over all processes, the gradient norm
    before clipping (None when not computed), whether the step was bad (non-finite:
    skipped and counted), and the detached feature maps (for the log_p diagnostics)."""

    loss: float
    grad_norm: float | None
    bad: bool = False
    features: tuple = ()


class Trainer:
    """One training run: built once, then ``run()``; all state lives here."""

    def __init__(self, config: TrainConfig, run: Path, processes: Processes, device, progress: bool):
        import torch

        self.config, self.run, self.processes, self.device = config, run, processes, device
        self.progress = progress and processes.main
        self.dataset = _make_dataset(config)
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, the caller's RNG untouched
            torch.manual_seed(config.seed)  # the same on every rank
            self._build_model()
        self._build_data()
        self.step, self.saved_step, self.bad_steps, self.bad_in_row, self.amp_skipped = 0, None, 0, 0, 0
        self.best_jf: float | None = None
        self.calibration = None  # PixelCenter's calibration frames, drawn at the first save
        self.resolved = self._resolved_config()

    # ---------------------------------------------------------------- build

    def _build_model(self) -> None:
        import torch

        from fmapicon.core.augment import make_augmentation
        from fmapicon.core.networks import build_network

        self.net = build_network(network_config(self.config)).to(self.device)
        self.augmentation = make_augmentation(self.config.aug, stride=self.net.stride)
        self.model = _distributed_model(_four_draw_module(self.net, self.augmentation), self.processes,
                                        self.device)
        if self.processes.distributed and self.device.type == "cuda":
            self.net = self.model.module.net  # the SyncBatchNorm copy
        self.optimizer = make_optimizer(self.config, self.net.parameters())
        self.amp_dtype = _amp_dtype(self.config, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.config.amp == "fp16")
        self.generator = torch.Generator()  # reseeded every step: see stream_seed

    def _build_data(self) -> None:
        world = self.processes.world
        if self.config.batch % world:
            raise UserError(f"--batch {self.config.batch} is the global batch and must divide evenly over "
                            f"{world} processes; use a multiple of {world}")
        order = GlobalBatches(_dataset_length(self.dataset), self.config.batch, self.processes.rank, world,
                              self.config.seed)
        self.data = DataStream(self.dataset, order, self.config.workers, self.device.type == "cuda",
                               self.config.seed)

    def _resolved_config(self) -> dict:
        import dataclasses as dc

        import torch

        from fmapicon import __version__

        return {**self.config.to_dict(), "input_scale": getattr(self.dataset, "input_scale", None),
                "network": dc.asdict(network_config(self.config)), "stride": self.net.stride,
                "world_size": self.processes.world, "fmapicon_version": __version__,
                "git_commit": _git_commit(), "torch_version": torch.__version__,
                "data_summary": _jsonable(getattr(self.dataset, "summary", None))}

    # ---------------------------------------------------------------- step

    def train_step(self, a, b) -> StepResult:
        """One step on this rank's share (``b x 3 x S x S`` each) of a global batch."""
        import torch

        if self.config.grad_accumulation == "off":
            self.optimizer.zero_grad(set_to_none=True)
        features, loss = self._forward(a.to(self.device, non_blocking=True), b.to(self.device, non_blocking=True))
        mean_loss = self._mean_over_processes(loss.detach())
        if not math.isfinite(mean_loss):  # agreed by all ranks: none runs backward
            return self._skip(mean_loss, None)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.clip if self.config.clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.net.parameters(), max_norm))
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            return self._skip(mean_loss, grad_norm)
        self._update(grad_norm)
        return StepResult(mean_loss, grad_norm, features=tuple(f.detach() for f in features))

    def _forward(self, a, b):
        """The four feature maps (float32) and the loss; a NaN loss when a map is not finite."""
        import torch

        from fmapicon.core import objective

        self.generator.manual_seed(stream_seed(self.config.seed, _AUGMENT_STREAM, self.processes.rank,
                                               self.step + 1))
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            features = self.model(a, b, self.generator)
        features = tuple(f.float() for f in features)
        if not all(bool(torch.isfinite(f).all()) for f in features):
            return features, torch.full((), math.nan, device=self.device)
        return features, -objective.log_p(*features, eps=self.config.log_eps).mean()

    def _mean_over_processes(self, value) -> float:
        if self.processes.distributed:
            import torch.distributed as dist

            value = value.clone()
            dist.all_reduce(value)
            value = value / self.processes.world
        return float(value)

    def _update(self, grad_norm: float) -> None:
        if not math.isfinite(grad_norm):  # fp16 overflow: the scaler skips and lowers its scale
            self.amp_skipped += 1
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _skip(self, loss: float, grad_norm: float | None) -> StepResult:
        """A non-finite step: no update, and its gradients are dropped."""
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, grad_norm, bad=True)

    # ---------------------------------------------------------------- log

    def diagnostics(self, features) -> dict:
        """Exact log_p (eps = 0) on the step's pairs and on shuffled pairs (B rolled by one
        in the batch: A with another video's B), averaged over processes."""
        import torch

        from fmapicon.core import objective

        a1, b2, a3, b4 = features
        with torch.no_grad():
            true = objective.log_p(a1, b2, a3, b4).mean()
            shuffled = objective.log_p(a1, b2.roll(1, 0), a3, b4.roll(1, 0)).mean() if len(a1) > 1 else None
        log_p = self._mean_over_processes(true)
        log_p_shuffled = None if shuffled is None else self._mean_over_processes(shuffled)
        return {"log_p": log_p, "log_p_shuffled": log_p_shuffled}

    def record(self, result: StepResult) -> dict:
        """The metrics line of this step; pairs/s over the steps since the previous line."""
        steps, seconds = self.step - self.window[0], time.monotonic() - self.window[1]
        return {"step": self.step, "loss": result.loss, **self.diagnostics(result.features),
                "lambda": float(self.net.lambda_), "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": result.grad_norm, "pairs_per_s": steps * self.config.batch / max(seconds, 1e-9),
                "bad_steps": self.bad_steps, "bad_steps_in_row": self.bad_in_row,
                "amp_skipped_steps": self.amp_skipped, "epoch": self.data.epoch,
                "elapsed_s": time.monotonic() - self.started}

    def bad_record(self, result: StepResult) -> dict:
        return {"step": self.step, "event": "non_finite", "loss": result.loss, "log_p": None,
                "log_p_shuffled": None, "lambda": float(self.net.lambda_),
                "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": result.grad_norm, "pairs_per_s": None,
                "bad_steps": self.bad_steps, "bad_steps_in_row": self.bad_in_row,
                "amp_skipped_steps": self.amp_skipped, "epoch": self.data.epoch,
                "elapsed_s": time.monotonic() - self.started}

    # ---------------------------------------------------------------- save

    def save(self) -> None:
        """Write state.pt, then last.safetensors with a calibrated PixelCenter (rank 0 only;
        each atomically)."""
        self.saved_step = self.step
        if not self.processes.main:
            return
        import torch

        from fmapicon.core.checkpoint import save_weights
        from fmapicon.runtime import atomic_write

        folder = self.run / CHECKPOINT_DIR
        with atomic_write(folder / STATE_FILE) as handle:
            torch.save(self.state_dict(), handle)
        with self.calibrated() as calibration:
            metadata = {**self.weights_metadata(), **calibration}
            save_weights(self.net, folder / LAST_WEIGHTS, metadata)
            if self.config.snapshot_every > 0 and self.step > 0 and self.step % self.config.snapshot_every == 0:
                save_weights(self.net, folder / SNAPSHOT_WEIGHTS.format(step=self.step), metadata)

    @contextlib.contextmanager
    def calibrated(self):
        """PixelCenter's running mean recomputed at the current weights on a fixed sample of
        the training data (``CALIBRATION_FRAMES`` first frames, ``FramePairs.first_frames``)
        for the duration: what weights files and evaluations get. Yields the weights-file
        metadata that records it (``pixel_center_calibration``; empty without a PixelCenter).
        The training buffer comes back afterwards, so state.pt, and a resumed run, hold the
        same buffer as an uninterrupted run. Why: see ``networks.calibrate_pixel_center``."""
        from fmapicon.core.networks import calibrate_pixel_center

        center = self.net.pixel_center
        if center is None:
            yield {}
            return
        if self.calibration is None:
            self.calibration = self.dataset.first_frames(CALIBRATION_FRAMES)
        kept = center.running_mean.clone()
        try:
            calibrate_pixel_center(self.net, self.calibration)
            yield {"pixel_center_calibration": json.dumps({"frames": len(self.calibration), "step": self.step})}
        finally:
            center.running_mean.copy_(kept)

    def weights_metadata(self) -> dict:
        return {"fmapicon_config": json.dumps(self.resolved), "step": str(self.step)}

    def state_dict(self) -> dict:
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.data.epoch,
                "position": self.data.position, "bad_steps": self.bad_steps, "bad_in_row": self.bad_in_row,
                "amp_skipped": self.amp_skipped, "best_jf_mean": self.best_jf, "rng": rng_state(),
                "config": self.config.to_dict()}

    def load_state(self) -> None:
        """Continue from checkpoints/state.pt (every rank reads it)."""
        import torch

        state = torch.load(self.run / CHECKPOINT_DIR / STATE_FILE, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.bad_steps, self.bad_in_row = state["step"], state["bad_steps"], state["bad_in_row"]
        self.amp_skipped, self.best_jf = state["amp_skipped"], state["best_jf_mean"]
        self.data.epoch, self.data.position = state["epoch"], state["position"]
        self.saved_step = self.step
        set_rng_state(state["rng"])

    def write_config(self) -> None:
        if self.processes.main:
            from fmapicon.runtime import atomic_write

            with atomic_write(self.run / CONFIG_FILE, "w") as handle:
                handle.write(json.dumps(self.resolved, indent=2) + "\n")

    # ---------------------------------------------------------------- evaluate

    def evaluate(self) -> dict:
        """Label propagation on ``config.davis`` (rank 0); keeps best.safetensors."""
        from fmapicon.core.checkpoint import save_weights

        with self.calibrated() as calibration:
            score = _evaluate_davis(self.net, self.config.davis, self.run / "eval" / f"step{self.step:07d}",
                                    self.resolved.get("input_scale"))
            if self.best_jf is None or score > self.best_jf:
                self.best_jf = score
                save_weights(self.net, self.run / CHECKPOINT_DIR / BEST_WEIGHTS,
                             {**self.weights_metadata(), **calibration, "jf_mean": str(score)})
        return {"jf_mean": score, "best_jf_mean": self.best_jf}

    # ---------------------------------------------------------------- run

    def run_loop(self, log: MetricsLog | None, stops: StopRequests) -> int | None:
        """Train until ``steps``, the time budget or a stop signal, then save; return the
        number of the signal that stopped it, or None."""
        from tqdm import tqdm

        self.started = time.monotonic()
        self.window = (self.step, self.started)  # step and time of the previous metrics line
        bar = tqdm(total=self.config.steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True)
        batches = iter(self.data)
        try:
            while self.step < self.config.steps:
                result = self.train_step(*next(batches))
                self.step += 1
                bar.update(1)
                final = self._should_stop(stops) or self.step == self.config.steps
                self._after_step(result, log, bar, final)
                if final:
                    break
        finally:
            bar.close()
            batches.close()
        self.save()
        return stops.signum

    def _after_step(self, result: StepResult, log, bar, final: bool) -> None:
        """Count a bad step, or log / evaluate / save on schedule (the final step is always logged)."""
        if result.bad:
            self._bad_step(result, log)
            return
        self.bad_in_row = 0
        evaluate = self.config.eval_every > 0 and self.step % self.config.eval_every == 0
        if final or evaluate or self.step % self.config.log_every == 0:
            self._log(result, log, bar, evaluate)
        snapshot = self.config.snapshot_every > 0 and self.step % self.config.snapshot_every == 0
        if not final and (snapshot or self.step % self.config.save_every == 0):
            self.save()

    def _log(self, result: StepResult, log, bar, evaluate: bool) -> None:
        record = self.record(result)
        if evaluate:
            record.update(self._evaluate_on_rank_zero())
        if log is not None:
            log.write(record)
        bar.set_postfix(loss=f"{result.loss:.4f}", pairs_s=f"{record['pairs_per_s']:.1f}")
        self.window = (self.step, time.monotonic())

    def _bad_step(self, result: StepResult, log) -> None:
        self.bad_steps += 1
        self.bad_in_row += 1
        if log is not None:
            log.write(self.bad_record(result))
        if self.bad_in_row >= self.config.max_bad_steps:
            raise TrainingDiverged(
                f"{self.bad_in_row} non-finite steps in a row (loss {result.loss}, gradient norm "
                f"{result.grad_norm}) at step {self.step}: stopped. The last good checkpoint (step "
                f"{self.saved_step}) is kept in {self.run / CHECKPOINT_DIR}; try a lower --lr, a --clip, or "
                "--amp off, then --resume it or start a new run")

    def _evaluate_on_rank_zero(self) -> dict:
        scores = self.evaluate() if self.processes.main else {}
        _barrier(self.processes)
        self.net.train()
        return scores

    def _should_stop(self, stops: StopRequests) -> bool:
        """Stop on a signal (to any rank) or at the time budget; every rank agrees."""
        import torch

        over_time = self.config.minutes > 0 and time.monotonic() - self.started > 60 * self.config.minutes
        wants = float(stops.signum is not None or over_time)
        if self.processes.distributed:
            import torch.distributed as dist

            flag = torch.tensor([wants], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if float(flag) and not wants:
                stops.signum = signal.SIGTERM  # another rank was signalled: save and stop with it
            wants = float(flag)
        return bool(wants)


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def _evaluate_davis(net, davis_root, out_dir: Path, input_scale) -> float:
    """J&F-Mean of label propagation (``fmapicon.evaluation.propagate``, the CRW protocol with its
    defaults) with ``net`` in eval mode at the training scale ``input_scale``.

    ``out_dir`` keeps the record (eval.json) and the toolkit CSVs; the predicted masks are
    written to a scratch folder and dropped, so evaluations do not pile up PNGs.
    """
    import tempfile

    from fmapicon.evaluation.features import FeatureModel
    from fmapicon.core.networks import UnitFeatures
    from fmapicon.evaluation.propagate import evaluate_davis

    device = next(net.parameters()).device
    model = FeatureModel(UnitFeatures(net), stride=net.stride, name="training network",
                         default_input_scale=input_scale or 1.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".predictions-") as scratch:
        results = evaluate_davis(model, davis_root, scratch, device=device, progress=False)
        for item in Path(scratch).iterdir():
            if item.is_file():
                os.replace(item, out_dir / item.name)
    return float(results["jf_mean"])


# --------------------------------------------------------------------------- entry point


def train(config: TrainConfig | None, out_dir, resume: bool = False, *, force: bool = False,
          progress: bool = True) -> Path:
    """Train a feature network as ``config`` says, writing the run folder ``out_dir``.

    Parameters
    ----------
    config : TrainConfig
        With ``resume``, None (the run's own config) or a config equal to the run's
        except for ``steps`` (the new total), ``device``, ``workers`` and ``minutes``
        (``saved_config(out_dir)`` gives the saved one).
    out_dir : the run folder (created; a non-empty one needs ``resume`` or ``force``)
    resume : continue from ``out_dir/checkpoints/state.pt`` at the exact step
    force : replace the run files of a non-empty ``out_dir``
    progress : show a progress bar (rank 0)

    Returns
    -------
    The run folder. Raises ``TrainingInterrupted`` after saving when SIGINT / SIGTERM
    arrived, ``TrainingDiverged`` after ``max_bad_steps`` non-finite steps in a row.
    """
    run = Path(out_dir)
    if config is None and not resume:
        raise UserError("train needs a TrainConfig; config=None is only for resume=True (the run's own config)")
    config = (config or saved_config(run)).validate()
    processes, device = init_processes(config.device)
    try:
        _amp_dtype(config, device)  # an impossible --amp fails before the folder is touched
        _rank_zero_error(processes, lambda: _prepare(run, config, resume, force))
        trainer = Trainer(config, run, processes, device, progress)
        _rank_zero_error(processes, lambda: check_free_space(run, _checkpoint_need(trainer.net)))
        signum = _run(trainer, run, resume)
    finally:
        _close_processes(processes)
    if signum is not None:
        raise TrainingInterrupted(signum, trainer.step, run)
    return run


def _prepare(run: Path, config: TrainConfig, resume: bool, force: bool) -> None:
    if config.eval_every:
        from fmapicon.data.davis import layout

        layout(config.davis)  # a wrong --davis fails now, not after hours of training
    prepare_run_folder(run, resume=resume, force=force)
    if resume:
        _check_resumable(config, saved_config(run))


def _checkpoint_need(net) -> int:
    """Bytes to keep free: four copies of the weights (state with optimizer, last, best)."""
    size = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    return max(MIN_FREE_BYTES, 4 * 3 * size)


def _run(trainer: Trainer, run: Path, resume: bool) -> int | None:
    if resume:
        trainer.load_state()
    trainer.write_config()
    log = MetricsLog(run, trainer.step if resume else None) if trainer.processes.main else None
    try:
        with StopRequests() as stops:
            if not resume:
                trainer.save()  # a checkpoint from the start: a "last good" one always exists
            return trainer.run_loop(log, stops)
    finally:
        if log is not None:
            log.close()
