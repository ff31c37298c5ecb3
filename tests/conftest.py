"""Shared fixtures: the real data beside the project, devices, and synthetic scenes.

Real data (../shared/data or $FMAPICON_DATA) is read in place, never copied; tests that
need it skip with a message when it is absent, as on a user's fresh clone.
"""

from __future__ import annotations

import os
from pathlib import Path

# as the fmapicon command does (cli.main): OpenMP's default spin-waiting made the tests' training
# runs many times slower on a machine busy with other jobs; it must be set before torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from fmapicon.runtime import shared_data_dir  # noqa: E402

_DATA = shared_data_dir()


def _need(relative: str) -> Path:
    if _DATA is None or not (_DATA / relative).exists():
        pytest.skip(f"real data {relative!r} not found: set FMAPICON_DATA or place it at ../shared/data")
    return _DATA / relative


@pytest.fixture(scope="session")
def davis2016_root() -> Path:
    """The 13 real DAVIS-2016 sequences (854x480, every frame annotated, 0/255 masks)."""
    return _need("davis2016-dev")


@pytest.fixture(scope="session")
def flyingchairs_dir() -> Path:
    """Four FlyingChairs pairs: NNNNNNN-img0.ppm, -img1.ppm, -gt.flo (512x384)."""
    return _need("flyingchairs")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """Small synthetic scenes in the DAVIS-2017 layout (3 sequences, 12 frames, 96x96, 2 objects)."""
    from fmapicon.data.synth_layout import write_scenes

    root = tmp_path_factory.mktemp("synth")
    write_scenes(root, sequences=3, frames=12, size=(96, 96), objects=2, seed=0)
    return root


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="comma-separated devices for device tests, e.g. cpu,cuda")


@pytest.fixture
def device(request):
    """The device named by --device (the first one); tests that care parametrize further."""
    import torch

    name = request.config.getoption("--device").split(",")[0]
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    return torch.device(name)
