"""Checkpoints: network weights as safetensors, written atomically, and ``fmapicon.load``.

A weights file holds the ``FeatureNet`` state dict (parameters and buffers, PixelCenter's
``pixel_center.running_mean`` included) and, in the safetensors metadata, the run's
resolved config as JSON under ``fmapicon_config`` (network preset, channels, lambda,
centre, size, ``input_scale``, ...), so that a file copied away from its run folder still
loads. Loading reads only safetensors (no pickle, no code from the file).

Layout of a run folder (``fmapicon.train``)::

    RUN/config.json
    RUN/checkpoints/last.safetensors    the latest weights
    RUN/checkpoints/best.safetensors    the best J&F so far (with --eval-every)
"""

from __future__ import annotations

import json
from pathlib import Path

from fmapicon.errors import UserError
from fmapicon.paths import display_path
from fmapicon.runtime import atomic_write

WHICH = ("last", "best")
# models whose weights ship in the package (src/fmapicon/weights/): name -> file
SHIPPED_MODELS = {"reference": "reference.safetensors"}
_CONFIG_KEY = "fmapicon_config"
# metadata: the evaluation values validated for the weights (JSON), which evaluation uses
# unless told otherwise (``scripts/ship_weights.py --default``)
DEFAULTS_KEY = "fmapicon_defaults"


def save_weights(model, path, metadata: dict | None = None) -> Path:
    """Write ``model``'s weights and buffers to ``path`` (safetensors, atomically).

    Parameters
    ----------
    model : a FeatureNet, or a wrapper of one (UnitFeatures, DistributedDataParallel)
    path : the ``.safetensors`` file to write (its folder is created)
    metadata : str -> str (other values are converted with ``str``); include
        ``fmapicon_config`` (the resolved run config as JSON) so the file loads alone.
    """
    from safetensors.torch import save

    net = feature_net(model)
    # copies: safetensors refuses tensors that share storage, and the file must not
    # alias live training tensors
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in net.state_dict().items()}
    text = {str(key): value if isinstance(value, str) else str(value) for key, value in (metadata or {}).items()}
    data = save(tensors, metadata=text)
    path = Path(path)
    with atomic_write(path) as handle:
        handle.write(data)
    return path


def feature_net(model):
    """The FeatureNet inside ``model`` (strips DistributedDataParallel and UnitFeatures)."""
    from torch.nn.parallel import DistributedDataParallel

    from fmapicon.core.networks import UnitFeatures

    while isinstance(model, (DistributedDataParallel, UnitFeatures)):
        model = model.module if isinstance(model, DistributedDataParallel) else model.net
    return model


def load(path, device="cpu", *, which: str = "last"):
    """The trained network of a run folder or weights file, ready for evaluation.

    Parameters
    ----------
    path : ``"reference"`` (the model shipped in the package, loaded offline), a run
        folder (uses ``checkpoints/<which>.safetensors``) or a ``.safetensors``
        file whose config is in its metadata, or in ``config.json`` beside it or two
        levels up (the run folder of ``RUN/checkpoints/x.safetensors``)
    device : where to put it (``"cpu"``, ``"cuda"``, ``"auto"``, a ``torch.device``)
    which : ``"last"`` or ``"best"`` (for a run folder)

    Returns
    -------
    ``UnitFeatures`` in eval mode on ``device``: ``B x 3 x H x W`` images in [0, 1] ->
    ``B x C x h x w`` unit-norm features, with ``.stride``, ``.channels``,
    ``.config`` (the run's resolved config, a dict including ``input_scale``) and
    ``.defaults`` (``DEFAULTS_KEY``: evaluation values validated for these weights, e.g.
    ``{"pixels_weight": 0.85}``; ``{}`` when the file records none).

    Raises ``UserError`` naming the file (and the tensor) for a file that is not readable
    safetensors, a config that names no network or one the tensors do not fit, a missing or
    unexpected tensor, and any NaN or infinite value in a parameter or buffer.
    """
    from fmapicon.core.networks import UnitFeatures
    from fmapicon.runtime import resolve_device

    file = weights_file(path, which)
    config = read_config(file)
    net = _described_network(config, file)
    _load_state(net, _read_tensors(file), file)
    model = UnitFeatures(net).to(device if not isinstance(device, str) else resolve_device(device)).eval()
    model.config = config
    model.defaults = read_defaults(file)
    return model


def shipped_model_file(name: str) -> Path | None:
    """The weights file of a model that ships inside the package (``SHIPPED_MODELS``), else None."""
    if name not in SHIPPED_MODELS:
        return None
    return Path(__file__).resolve().parents[1] / "weights" / SHIPPED_MODELS[name]  # src/fmapicon/weights


def weights_file(path, which: str = "last") -> Path:
    """The ``.safetensors`` file that ``path`` (a shipped model's name, a run folder or a
    file) names. A shipped name wins over a folder of the same name: write ``./reference``
    for the folder."""
    if which not in WHICH:
        raise ValueError(f"which checkpoint: expected one of {', '.join(WHICH)}, got {which!r}")
    shipped = shipped_model_file(str(path)) if isinstance(path, str) else None
    if shipped is not None:
        if not shipped.is_file():
            raise UserError(f"the shipped model {path!r} is missing from this installation ({shipped}); "
                            "reinstall fmapicon")
        return shipped
    path = Path(path)
    if path.is_dir():
        file = path / "checkpoints" / f"{which}.safetensors"
        if not file.is_file():
            raise UserError(f"{path} has no checkpoints/{which}.safetensors; give a run folder of "
                            "`fmapicon train` (best exists only with --eval-every) or a .safetensors file")
        return file
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; give a run folder or a .safetensors file")
    if path.suffix != ".safetensors":
        raise UserError(f"{path} is not a .safetensors file; only safetensors weights are loaded "
                        "(no pickles): give a run folder or its checkpoints/*.safetensors")
    return path


def read_config(file: Path) -> dict:
    """The run config of a weights file: its metadata, else a config.json nearby."""
    embedded = _metadata(file).get(_CONFIG_KEY)
    if embedded:
        return _config_json(embedded, f"the {_CONFIG_KEY!r} metadata of {display_path(file)}")
    for folder in (file.parent, file.parent.parent):
        if (folder / "config.json").is_file():
            return _config_json((folder / "config.json").read_text(), display_path(folder / "config.json"))
    raise UserError(f"{file} carries no config (metadata {_CONFIG_KEY!r}) and no config.json was found beside "
                    "it or two levels up; keep it in its run folder (RUN/checkpoints/) to load it")


def read_defaults(file: Path) -> dict:
    """The ``DEFAULTS_KEY`` entry of a weights file's metadata as a dict ({} when absent)."""
    text = _metadata(file).get(DEFAULTS_KEY)
    try:
        defaults = json.loads(text) if text else {}
    except ValueError as error:
        raise UserError(f"{display_path(file)}: its {DEFAULTS_KEY} metadata is not JSON ({error})") from error
    if not isinstance(defaults, dict):
        raise UserError(f"{display_path(file)}: its {DEFAULTS_KEY} metadata must be a JSON object, got {text!r}")
    return defaults


def saved_step(path) -> int | None:
    """The training step of the last weights file of a run folder (or of a file); None
    when its metadata does not say."""
    step = _metadata(weights_file(path)).get("step")
    return int(step) if step is not None and step.isdigit() else None


def _metadata(file: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error types for a bad header
        raise UserError(f"{file} is not a readable safetensors file ({error}); it may be truncated or "
                        "not a checkpoint") from error


# --------------------------------------------------------------------------- checks on load


def _config_json(text: str, where: str) -> dict:
    """A run config from JSON text, or a one-line refusal naming ``where`` it came from."""
    try:
        config = json.loads(text)
    except ValueError as error:
        raise UserError(f"{where} is not valid JSON ({error}); the run config is unreadable") from error
    if not isinstance(config, dict):
        raise UserError(f"{where} holds a JSON {type(config).__name__}, expected a run config (an object)")
    return config


def _described_network(config: dict, file: Path):
    """The network that ``config`` describes; ``network_config`` refuses one it cannot build
    in one line naming the file (a checked ``NetworkConfig`` always builds)."""
    from fmapicon.core.networks import build_network, network_config

    return build_network(network_config(config, source=f"the config of {display_path(file)}"))


def _read_tensors(file: Path) -> dict:
    """Every tensor of a weights file, each checked to hold only finite values."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(file), device="cpu")
    except Exception as error:  # safetensors raises its own error types for a bad body
        raise UserError(f"{display_path(file)} is not a readable safetensors file ({error}); it may be "
                        "truncated or not a checkpoint") from error
    for name, tensor in state.items():
        check_finite(tensor, name, file)
    return state


def check_finite(tensor, name: str, file) -> None:
    """Refuse a weights tensor with NaN or infinite values (a diverged run, a float16 copy
    that overflowed, a damaged file): features from it would be meaningless numbers."""
    import torch

    if not (tensor.is_floating_point() or tensor.is_complex()):
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    nan = int(torch.isnan(tensor).sum())
    infinite = int((~finite).sum()) - nan
    raise UserError(f"{display_path(file)}: tensor {name!r} ({tuple(tensor.shape)}, {str(tensor.dtype)[6:]}) holds "
                    f"{nan} NaN and {infinite} infinite value(s) of {tensor.numel()}; these weights cannot give "
                    "features: use another checkpoint (e.g. checkpoints/best.safetensors or one saved before "
                    "the run diverged)")


def _load_state(net, state: dict, file: Path) -> None:
    """Load ``state`` into ``net`` exactly: every tensor present, none extra, every shape equal."""
    expected = net.state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    shapes = [f"{name} {tuple(state[name].shape)} (network: {tuple(expected[name].shape)})"
              for name in expected if name in state and state[name].shape != expected[name].shape]
    problems = [f"{label} {len(names)}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                for label, names in (("missing tensors", missing), ("unexpected tensors", unexpected),
                                     ("tensors of another shape", shapes)) if names]
    if problems:
        raise UserError(f"{display_path(file)} does not match the network its config describes "
                        f"({type(net).__name__}): {'; '.join(problems)}; the config and the weights "
                        "come from different runs")
    net.load_state_dict(state, strict=True)
