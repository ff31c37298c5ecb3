"""The training configuration: ``TrainConfig`` (every knob with its help text and value
check), the two recipes' defaults (``RECIPE_VALUES``), the per-value check the command
line shares (``check_value``) and config files (.toml / .json).

Standard library only, so that the command line reads it for ``--help`` without torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from fmapicon.errors import UserError


NETS = ("short", "tall", "taller", "resnet-s4", "resnet-s8")  # = networks.NETS (kept torch-free here)
RECIPES = ("reference", "original")
AUGMENTATIONS = ("none", "affine", "roll", "roll+affine")  # = augment.AUGMENTATIONS
OPTIMIZERS = ("rmsprop", "adam", "adamw")
AMP_MODES = ("off", "bf16", "fp16")
GRAD_ACCUMULATION = ("off", "original")
CROPS = ("center", "random")

# keys that --resume may change; everything else must stay as the run was started
RESUMABLE = ("steps", "device", "workers", "minutes")

# options that measured no better than the reference recipe and left the package: the value
# that turned each off (a saved config holding it still loads), and the last commit that runs
# them (their measurements: docs/experiments.md)
REMOVED_OPTIONS = {"weighting": "frames", "pixels_weight": 0.0, "home_radius": 0, "color_jitter": 0.0}
REMOVED_AT = "6e9c336"


_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


# The fields in which the two recipes differ; every other default is shared. The dataclass
# defaults are the reference recipe's (fmapicon.load("reference") was trained with them).
RECIPE_VALUES = {
    "reference": dict(net="resnet-s4", size=128, batch=16, max_gap=10, crop="random", crop_min=0.4, crop_max=0.7,
                      lambda_init=4.0, optim="adam", steps=1000),
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
    init: str | None = _knob(None, "start from these weights instead of random ones (fine-tuning): a shipped "
                             "model (reference), a run folder (its last checkpoint) or a .safetensors file; the "
                             "network preset and channels are taken from it (--net or --channels that differ are "
                             "an error), lambda and the weights too; none = a random network")
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
                     "positional code), affine (attempt 1), roll, roll+affine (attempt 3, the writeup's final version)",
                     choices=AUGMENTATIONS)
    center: bool = _knob(True, "PixelCenter (attempt 2): subtract the per-location batch mean of the features")
    lambda_init: float = _knob(_REFERENCE["lambda_init"], "initial lambda of NormScale: features are unit vectors times lambda, "
                               "logits reach lambda^2; larger values give sharper matches", above=0.0)
    learn_lambda: bool = _knob(True, "train NormScale's lambda (the writeup's trainable radius); "
                               "--no-learn-lambda keeps it at --lambda-init, so the objective's softmaxes do not "
                               "sharpen as training goes on")
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
        values = _without_removed({str(key).replace("-", "_"): value for key, value in mapping.items()})
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


def _without_removed(values: dict) -> dict:
    """``values`` without the removed options that hold their "off" value (an older run's
    saved config); ``UserError`` for one that asks for a removed behaviour."""
    asked = {key: values[key] for key in REMOVED_OPTIONS if key in values and values[key] != REMOVED_OPTIONS[key]}
    if asked:
        listed = ", ".join(f"{key}={value!r}" for key, value in asked.items())
        raise UserError(f"training option(s) {listed} no longer exist: they measured no better than the reference "
                        f"recipe (docs/experiments.md); drop them, or run fmapicon at commit {REMOVED_AT} to use them")
    return {key: value for key, value in values.items() if key not in REMOVED_OPTIONS}


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


def check_resumable(config: TrainConfig, saved: TrainConfig) -> None:
    changed = [f.name for f in dataclasses.fields(TrainConfig)
               if f.name not in RESUMABLE and getattr(config, f.name) != getattr(saved, f.name)]
    if changed:
        details = ", ".join(f"{n}: {getattr(saved, n)!r} -> {getattr(config, n)!r}" for n in changed)
        raise UserError(f"--resume continues a run with its own config; only {', '.join(RESUMABLE)} may "
                        f"change, but these differ: {details}. Start a new --out to change them.")
