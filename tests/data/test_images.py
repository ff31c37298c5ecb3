"""The one image reader: every mode by one rule, and every command reads a file the same way."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from fmapicon.data.images import read_image, rgb_image, to_tensor
from fmapicon.errors import UserError


def _grey_picture(height=48, width=64, seed=0):
    """A smooth grey picture with texture (so that matching has something to find)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 128 + 60 * np.sin(x / 5.0) * np.cos(y / 7.0) + rng.normal(0, 12, (height, width))
    return np.clip(np.round(base), 0, 255).astype(np.uint8)


def _save_modes(grey: np.ndarray, folder, stem: str) -> dict:
    """The same grey picture saved as 8-bit RGB, grey (L), 16-bit grey (I;16), palette (P)
    and RGBA (opaque): {mode: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {mode: folder / f"{stem}-{mode.replace(';', '')}.png" for mode in ("RGB", "L", "I;16", "P", "RGBA")}
    Image.fromarray(np.repeat(grey[..., None], 3, -1), "RGB").save(paths["RGB"])
    Image.fromarray(grey, "L").save(paths["L"])
    Image.fromarray(grey.astype(np.uint16) * 257).save(paths["I;16"])
    palette = Image.fromarray(grey, "L").convert("P")  # L -> P keeps the grey levels in its palette
    palette.save(paths["P"])
    rgba = np.concatenate([np.repeat(grey[..., None], 3, -1), np.full((*grey.shape, 1), 255, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(paths["RGBA"])
    assert Image.open(paths["I;16"]).mode.startswith("I")
    return paths


def test_every_mode_of_one_picture_reads_as_the_same_array(tmp_path):
    grey = _grey_picture()
    paths = _save_modes(grey, tmp_path, "a")
    expected = np.repeat(grey[..., None], 3, -1)
    for mode, path in paths.items():
        assert np.array_equal(read_image(path), expected), mode


def test_sixteen_bit_and_float_frames_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 16).astype(np.uint16).reshape(4, 4)
    Image.fromarray(ramp).save(tmp_path / "f16.png")
    expected = np.round(ramp / 65535 * 255).astype(np.uint8)
    assert np.array_equal(read_image(tmp_path / "f16.png")[..., 0], expected)
    unit = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    Image.fromarray(unit, "F").save(tmp_path / "f.tif")
    assert np.array_equal(read_image(tmp_path / "f.tif")[..., 1], np.round(unit * 255).astype(np.uint8))
    assert rgb_image(Image.fromarray(ramp)).mode == "RGB"


def test_eval_match_and_training_read_every_mode_alike(tmp_path):
    """The picture saved in five modes: ``eval``'s frames (``read_frames``), training's pairs
    (``FramePairs`` on a frame folder) and ``fmapicon match``'s flow are the same for each."""
    from fmapicon.cli import main
    from fmapicon.data.davis import read_frames
    from fmapicon.data.flow import read_flo
    from fmapicon.data.pairs import FramePairs

    first, second = _grey_picture(seed=0), np.roll(_grey_picture(seed=0), 3, axis=1)
    results = {}
    for mode in ("RGB", "L", "I;16", "P", "RGBA"):
        folder = tmp_path / mode.replace(";", "")
        paths = [_save_modes(picture, folder / "src", f"{t:05d}")[mode] for t, picture in enumerate((first, second))]
        clip = folder / "clip"
        clip.mkdir()
        for t, path in enumerate(paths):
            path.rename(clip / f"{t:05d}.png")
        frames = read_frames(sorted(clip.iterdir()))
        pair = FramePairs([str(clip)], size=32, max_gap=1, cache_dir=False)[0]
        out = folder / "match"
        assert main(["match", str(clip / "00000.png"), str(clip / "00001.png"), "--model", "pixels", "--stride", "8",
                     "--out", str(out)]) == 0
        results[mode] = (frames, pair[0], pair[1], read_flo(out / "flow_ab.flo"))
    reference = results["RGB"]
    for mode, (frames, a, b, flow) in results.items():
        assert np.array_equal(frames, reference[0]), mode
        assert torch.equal(a, reference[1]) and torch.equal(b, reference[2]), mode
        assert np.array_equal(flow, reference[3]), mode


def test_to_tensor_is_x_over_255_in_float32_and_checks_its_input():
    pixels = np.arange(2 * 4 * 5 * 3, dtype=np.int64).reshape(2, 4, 5, 3).astype(np.uint8)
    pixels.setflags(write=False)
    tensor = to_tensor(pixels)
    assert tensor.shape == (2, 3, 4, 5) and tensor.dtype == torch.float32
    expected = torch.from_numpy(pixels.copy()).permute(0, 3, 1, 2).float() / 255.0
    assert torch.equal(tensor, expected)
    assert torch.equal(to_tensor(pixels[0]), expected[0])
    with pytest.raises(TypeError, match="uint8"):
        to_tensor(pixels.astype(np.float32))
    with pytest.raises(ValueError, match="H x W x 3"):
        to_tensor(pixels[..., :2])


def test_unreadable_files_are_user_errors_naming_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    for path in (tmp_path / "broken.png", tmp_path / "missing.png"):
        with pytest.raises(UserError, match=path.name):
            read_image(path)
