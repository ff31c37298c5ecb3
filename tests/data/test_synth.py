"""Synthetic scenes: the flow is true, the masks and palette read back, the bytes repeat."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from fmapicon.data.davis import davis_palette, read_annotation
from fmapicon.errors import UserError
from fmapicon.data.flow import read_flo
from fmapicon.data.synth import build_scene, generate_scene, scene_seed
from fmapicon.data.synth_layout import read_marker, write_scenes


def backward_warp(image: np.ndarray, flow: np.ndarray, order: int = 1) -> np.ndarray:
    """out(x) = image(x + flow(x)) (bilinear, or nearest with order=0), H x W [x C]."""
    height, width = flow.shape[:2]
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    coords = [rows + flow[..., 1], cols + flow[..., 0]]
    if image.ndim == 2:
        return ndimage.map_coordinates(image, coords, order=order, mode="nearest")
    return np.stack([ndimage.map_coordinates(image[..., c].astype(np.float32), coords, order=order,
                                             mode="nearest") for c in range(image.shape[2])], -1)


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scene():
    return generate_scene(3, frames=10, size=(96, 128), objects=3)


def test_shapes_and_types(scene):
    assert scene.frames.shape == (10, 96, 128, 3) and scene.frames.dtype == np.uint8
    assert scene.masks.shape == (10, 96, 128) and scene.masks.dtype == np.uint8
    assert scene.flows.shape == (9, 96, 128, 2) and scene.flows.dtype == np.float32
    assert scene.visible.shape == (9, 96, 128) and scene.visible.dtype == bool
    assert set(np.unique(scene.masks[0])) == {0, 1, 2, 3}, "every object is in the first frame"
    assert scene.frames.std() > 20, "textured, not flat"


@pytest.mark.parametrize("seed,size,objects", [(3, (96, 128), 3), (11, (64, 64), 4), (5, (128, 96), 1)])
def test_flow_warps_next_frame_onto_this_one(seed, size, objects):
    """Frame t+1 sampled at x + flow(x) is frame t on visible pixels (and so is the mask).

    The residual is resampling (both frames are bilinear samples of the texture) and, on
    the one-pixel anti-aliased rim of each mask, the blend with the layer behind.
    """
    scene = generate_scene(seed, frames=8, size=size, objects=objects)
    errors, interior_errors, agreement = [], [], []
    for t in range(7):
        visible = scene.visible[t]
        assert visible.mean() > 0.8
        rim = ndimage.maximum_filter(scene.masks[t], 3) != ndimage.minimum_filter(scene.masks[t], 3)
        warped = backward_warp(scene.frames[t + 1], scene.flows[t])
        error = np.abs(warped - scene.frames[t].astype(np.float32)).mean(-1)
        errors.append(error[visible].mean())
        interior_errors.append(error[visible & ~rim].mean())
        # nearest-neighbour sampling of ids is ambiguous only on the rim
        mask = backward_warp(scene.masks[t + 1], scene.flows[t], order=0)
        agreement.append((mask == scene.masks[t])[visible & ~rim].mean())
    assert np.mean(errors) < 3.0 and np.max(errors) < 3.5, f"mean abs error {np.round(errors, 2)} grey levels"
    assert np.mean(interior_errors) < 2.0 and np.max(interior_errors) < 2.5, np.round(interior_errors, 2)
    assert np.min(agreement) > 0.99


def test_flow_is_wrong_when_perturbed(scene):
    """A flow off by one pixel, or no flow at all, is caught by the same check (the test has teeth)."""
    assert np.linalg.norm(scene.flows, axis=-1).mean() > 0.5, "the scene moves"
    visible = scene.visible[0]
    frame = scene.frames[0].astype(np.float32)
    right = np.abs(backward_warp(scene.frames[1], scene.flows[0]) - frame).mean(-1)[visible].mean()
    shifted = scene.flows[0] + np.array([1.0, 0.0], dtype=np.float32)
    wrong = np.abs(backward_warp(scene.frames[1], shifted) - frame).mean(-1)[visible].mean()
    assert wrong > 2 * right
    still = np.abs(scene.frames[1].astype(np.float32) - frame).mean(-1)[visible].mean()
    assert still > 2 * right


def test_visibility_marks_occlusion_and_exits():
    """Pixels whose target is outside the frame or behind another object are not visible."""
    scene = generate_scene(7, frames=12, size=(64, 64), objects=4)
    height, width = scene.masks.shape[1:]
    rows, cols = np.mgrid[0:height, 0:width]
    for t in range(11):
        x = cols + scene.flows[t, ..., 0]
        y = rows + scene.flows[t, ..., 1]
        outside = (x < -0.5) | (x > width - 0.5) | (y < -0.5) | (y > height - 0.5)
        assert not scene.visible[t][outside].any()
    assert (~scene.visible).sum() > 0


def test_same_seed_same_scene_and_different_seed_differs():
    first = generate_scene(21, frames=4, size=(48, 48), objects=2)
    again = generate_scene(21, frames=4, size=(48, 48), objects=2)
    other = generate_scene(22, frames=4, size=(48, 48), objects=2)
    assert np.array_equal(first.frames, again.frames) and np.array_equal(first.flows, again.flows)
    assert np.array_equal(first.masks, again.masks)
    assert not np.array_equal(first.frames, other.frames)


def test_model_renders_any_frame_alone():
    """The on-the-fly source renders frame t without the frames before it: same pixels."""
    scene = generate_scene(5, frames=6, size=(48, 64), objects=2)
    model = build_scene(5, frames=6, size=(48, 64), objects=2)
    image, ids = model.render(4)
    assert np.array_equal(image, scene.frames[4]) and np.array_equal(ids, scene.masks[4])


def test_synth_root_layout(synth_root):
    """The conftest fixture: 3 sequences x 12 frames at 96 x 96, 2 objects, every file there."""
    names = (synth_root / "ImageSets" / "2017" / "val.txt").read_text().split()
    assert names == ["synth-0000", "synth-0001", "synth-0002"]
    for name in names:
        jpgs = sorted((synth_root / "JPEGImages" / "480p" / name).glob("*.jpg"))
        pngs = sorted((synth_root / "Annotations" / "480p" / name).glob("*.png"))
        flos = sorted((synth_root / "Flow" / name).glob("*.flo"))
        assert [p.stem for p in jpgs] == [f"{t:05d}" for t in range(12)]
        assert [p.stem for p in pngs] == [p.stem for p in jpgs]
        assert [p.stem for p in flos] == [f"{t:05d}" for t in range(11)]
        assert (synth_root / "Videos" / f"{name}.mp4").stat().st_size > 0
        assert Image.open(jpgs[0]).size == (96, 96)


def test_written_files_read_back(synth_root):
    """Annotations (ids and palette), flows and JPEG frames match the scene that was written."""
    scene = generate_scene(scene_seed(0, 1), frames=12, size=(96, 96), objects=2)
    sequence = "synth-0001"
    for t in (0, 5, 11):
        path = synth_root / "Annotations" / "480p" / sequence / f"{t:05d}.png"
        assert np.array_equal(read_annotation(path), scene.masks[t])
        with Image.open(path) as image:
            assert image.mode == "P"
            palette = np.array(image.getpalette()[: 3 * 256], dtype=np.uint8).reshape(-1, 3)
        assert np.array_equal(palette[:3], davis_palette()[:3])
        jpg = np.asarray(Image.open(synth_root / "JPEGImages" / "480p" / sequence / f"{t:05d}.jpg"), np.float32)
        assert np.abs(jpg - scene.frames[t]).mean() < 2.0, "JPEG quality 95"
    for t in (0, 10):
        assert np.array_equal(read_flo(synth_root / "Flow" / sequence / f"{t:05d}.flo"), scene.flows[t])


def test_video_round_trip(synth_root):
    """Decoding Videos/<seq>.mp4 with PyAV gives the frames back within codec tolerance."""
    av = pytest.importorskip("av")
    scene = generate_scene(scene_seed(0, 2), frames=12, size=(96, 96), objects=2)
    with av.open(str(synth_root / "Videos" / "synth-0002.mp4")) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == scene.frames.shape
    errors = np.abs(decoded.astype(np.float32) - scene.frames).mean(axis=(1, 2, 3))
    assert errors.max() < 6.0, f"per-frame mean abs error {errors.round(2)}"
    # each decoded frame is closest to its own source frame (no shift in time)
    neighbour = np.abs(decoded[1:].astype(np.float32) - scene.frames[:-1]).mean(axis=(1, 2, 3))
    assert (errors[1:] < neighbour).all()


def test_same_seed_same_bytes(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    write_scenes(first, sequences=2, frames=5, size=(48, 64), objects=2, seed=7)
    write_scenes(second, sequences=2, frames=5, size=(48, 64), objects=2, seed=7)
    digest = tree_digest(first)
    assert any(name.endswith(".mp4") for name in digest)
    assert digest == tree_digest(second)
    third = tmp_path / "three"
    write_scenes(third, sequences=2, frames=5, size=(48, 64), objects=2, seed=8, video=False)
    assert not (third / "Videos").exists()
    assert tree_digest(third)["JPEGImages/480p/synth-0000/00000.jpg"] != digest["JPEGImages/480p/synth-0000/00000.jpg"]


def test_never_mixes_with_existing_files(tmp_path):
    out = tmp_path / "scenes"
    write_scenes(out, sequences=2, frames=3, size=(32, 32), objects=1, video=False)
    assert read_marker(out)["complete"] is True and read_marker(out)["names"] == ["synth-0000", "synth-0001"]
    with pytest.raises(UserError, match="not empty"):
        write_scenes(out, sequences=1, frames=3, size=(32, 32), objects=1, video=False)
    # overwrite replaces the previous synth output entirely: no stale synth-0001 remains
    write_scenes(out, sequences=1, frames=3, size=(32, 32), objects=1, video=False, overwrite=True)
    assert sorted(p.name for p in (out / "JPEGImages" / "480p").iterdir()) == ["synth-0000"]
    # a DAVIS folder that synth did not write is never touched, even with overwrite
    davis = tmp_path / "davis"
    (davis / "JPEGImages").mkdir(parents=True)
    with pytest.raises(UserError, match="did not write"):
        write_scenes(davis, sequences=1, frames=3, size=(32, 32), objects=1, video=False, overwrite=True)
    assert (davis / "JPEGImages").is_dir()


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(UserError, match="even"):
        write_scenes(tmp_path / "odd", sequences=1, frames=3, size=(33, 32), video=True)
    with pytest.raises(UserError, match="at least 2 frames"):
        generate_scene(0, frames=1, size=(32, 32))


def test_cli_writes_and_refuses_to_mix(tmp_path, capsys):
    from fmapicon.cli import main

    out = tmp_path / "cli"
    argv = ["synth", str(out), "--sequences", "1", "--frames", "3", "--size", "32", "48", "--objects", "2",
            "--seed", "4", "--set", "train", "--no-video"]
    assert main(argv) == 0
    assert "wrote 1 sequences" in capsys.readouterr().out
    assert (out / "ImageSets" / "2017" / "train.txt").read_text() == "synth-0000\n"
    assert Image.open(out / "JPEGImages" / "480p" / "synth-0000" / "00002.jpg").size == (48, 32)
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
