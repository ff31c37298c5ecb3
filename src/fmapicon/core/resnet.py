"""Strided backbones: a ResNet-18-style encoder with a light top-down decoder.

``StridedResNet(stride=s)`` maps images ``B x 3 x H x W`` to features
``B x C x ceil(H / s) x ceil(W / s)`` for ``s`` in {4, 8}:

    stem      conv3x3/2 (3 -> 32) -> conv3x3/2 (32 -> 64)             stride 4
    stage 1   BasicBlock(64)                                          stride 4
    stage 2   BasicBlock(64 -> 128, /2) -> BasicBlock(128)            stride 8
    stage 3   BasicBlock(128 -> 256, /2) -> BasicBlock(256)           stride 16
    decoder   p = lateral(stage 3); at each finer level down to s:
              p = conv3x3(relu(upsample(p) + lateral(stage k)))      (feature-pyramid style)
    head      conv3x3 (128 -> C)

BasicBlock is ResNet's (He et al., CVPR 2016): ``relu(x' + bn(conv(relu(bn(conv(x))))))``
with ``x'`` the identity or a strided 1 x 1 projection. Stage 3 gives every output cell a
receptive field of about 100 input pixels (as CRW's ResNet-18 at stride 8, Jabri et al.,
NeurIPS 2020), while the decoder keeps the output at the protocol's cell size: at input
scale 0.5 a stride-4 map has one cell per 8 x 8 pixels of a 480p frame.

Upsampling is nearest-neighbour to the lateral's own size, so any H, W >= 1 work.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

STRIDES = (4, 8)
DECODER_CHANNELS = 128


def _conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """ResNet's two-convolution residual block, ``in_channels -> out_channels`` at ``stride``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv_bn(in_channels, out_channels, stride)
        self.conv2 = _conv_bn(out_channels, out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        return F.relu(self.shortcut(x) + self.conv2(F.relu(self.conv1(x))))


class StridedResNet(nn.Module):
    """Features at stride 4 or 8: ``B x 3 x H x W`` -> ``B x C x ceil(H/s) x ceil(W/s)``.

    Parameters
    ----------
    stride : 4 or 8, input pixels per output cell
    out_channels : C
    """

    def __init__(self, stride: int = 4, out_channels: int = 64):
        super().__init__()
        if stride not in STRIDES:
            raise ValueError(f"StridedResNet stride must be one of {STRIDES}, got {stride!r}")
        self.stride, self.channels = int(stride), int(out_channels)
        self.stem = nn.Sequential(_conv_bn(3, 32, 2), nn.ReLU(), _conv_bn(32, 64, 2), nn.ReLU())
        self.stages = nn.ModuleList([
            BasicBlock(64, 64),
            nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128)),
            nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256)),
        ])
        self.kept = 3 - STRIDES.index(self.stride)  # stages whose resolution the decoder reaches
        widths = (64, 128, 256)[-self.kept:]
        self.lateral = nn.ModuleList(nn.Conv2d(w, DECODER_CHANNELS, 1) for w in widths)
        self.smooth = nn.ModuleList(_conv_bn(DECODER_CHANNELS, DECODER_CHANNELS) for _ in widths[1:])
        self.head = nn.Conv2d(DECODER_CHANNELS, out_channels, 3, padding=1)

    def forward(self, images):
        x, found = self.stem(images), []
        for stage in self.stages:  # strides 4, 8, 16
            x = stage(x)
            found.append(x)
        kept = found[-self.kept:]
        top = self.lateral[-1](kept[-1])
        for k in reversed(range(self.kept - 1)):
            lateral = self.lateral[k](kept[k])
            up = F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
            top = self.smooth[k](F.relu(up + lateral))
        return self.head(F.relu(top))
