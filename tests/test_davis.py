"""DAVIS files: palette, annotation styles, layout and sequence lists."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fmapicon.davis import (annotation_paths, available_sets, davis_palette, frame_paths, layout,
                            read_annotation, sequence_names, write_indexed_png)
from fmapicon.errors import UserError


def test_palette_is_the_davis_one():
    palette = davis_palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert palette[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert palette[255].tolist() == [224, 224, 192]  # the void colour of PASCAL / DAVIS


def test_indexed_png_round_trip(tmp_path):
    ids = np.random.default_rng(0).integers(0, 5, size=(17, 23)).astype(np.uint8)
    ids[0, 0] = 255
    write_indexed_png(tmp_path / "a.png", ids)
    with Image.open(tmp_path / "a.png") as image:
        assert image.mode == "P"
    assert np.array_equal(read_annotation(tmp_path / "a.png"), ids)


def test_davis2016_grayscale_is_one_object(tmp_path):
    grey = np.zeros((8, 9), np.uint8)
    grey[2:5, 3:7] = 255
    Image.fromarray(grey, mode="L").save(tmp_path / "m.png")
    assert np.array_equal(read_annotation(tmp_path / "m.png"), (grey == 255).astype(np.uint8))


def test_grayscale_ids_other_than_0_255_are_kept(tmp_path):
    grey = np.array([[0, 1, 2], [2, 1, 255]], np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "m.png")
    assert np.array_equal(read_annotation(tmp_path / "m.png"), grey)


def test_grey_with_alpha_reads_the_grey(tmp_path):
    grey = np.zeros((6, 6), np.uint8)
    grey[1:3, 1:3] = 255
    Image.fromarray(np.stack([grey, np.full_like(grey, 255)], axis=-1), mode="LA").save(tmp_path / "m.png")
    assert read_annotation(tmp_path / "m.png").sum() == 4


def test_rgb_in_palette_colours_gives_ids(tmp_path):
    ids = np.array([[0, 1, 2], [3, 1, 0]], np.uint8)
    Image.fromarray(davis_palette()[ids]).save(tmp_path / "m.png")
    assert np.array_equal(read_annotation(tmp_path / "m.png"), ids)
    other = np.zeros((2, 3, 3), np.uint8)
    other[0, 0] = (10, 200, 30)
    Image.fromarray(other).save(tmp_path / "o.png")
    assert read_annotation(tmp_path / "o.png").tolist() == [[1, 0, 0], [0, 0, 0]]


def test_sixteen_bit_values_beyond_255_are_refused(tmp_path):
    Image.fromarray(np.array([[0, 300]], np.uint16)).save(tmp_path / "m.png")
    with pytest.raises(UserError, match="up to 300"):
        read_annotation(tmp_path / "m.png")


def _tiny_root(root, sets=("2017/val",)):
    for name in ("a", "b"):
        (root / "JPEGImages" / "480p" / name).mkdir(parents=True)
        Image.new("RGB", (4, 3)).save(root / "JPEGImages" / "480p" / name / "00000.jpg")
        write_indexed_png(root / "Annotations" / "480p" / name / "00000.png", np.zeros((3, 4), np.uint8))
    for set_path in sets:
        path = root / "ImageSets" / f"{set_path}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("a\nb\n\n")
    return root


def test_layout_and_sequence_lists(tmp_path):
    root = _tiny_root(tmp_path / "r", sets=("2017/val", "dev"))
    images, annotations = layout(root)
    assert images == root / "JPEGImages" / "480p" and annotations == root / "Annotations" / "480p"
    assert sequence_names(root, "val") == ["a", "b"]
    assert sequence_names(root, "dev") == ["a", "b"]
    assert sequence_names(root, "val", "b") == ["b"]
    assert available_sets(root) == ["dev", "val"]
    assert [p.name for p in frame_paths(images, "a")] == ["00000.jpg"]
    assert [p.name for p in annotation_paths(annotations, "a")] == ["00000.png"]


def test_layout_errors_say_what_is_missing(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(UserError, match="Annotations"):
        layout(tmp_path)
    root = _tiny_root(tmp_path / "r")
    with pytest.raises(UserError, match="available sets: \\['val'\\]"):
        sequence_names(root, "test")
    with pytest.raises(UserError, match="nope"):
        sequence_names(root, "val", ["a", "nope"])


def test_shared_davis2016_reads(davis2016_root):
    names = sequence_names(davis2016_root, "dev")
    assert len(names) == 13 and "dog-agility" in names
    _, annotations = layout(davis2016_root)
    first = read_annotation(annotation_paths(annotations, "bear")[0])
    assert first.shape == (480, 854) and set(np.unique(first)) == {0, 1}
    # bear/00077.png is stored grey + alpha: the alpha must not turn the frame into the object
    with_alpha = read_annotation(annotations / "bear" / "00077.png")
    assert 0 < with_alpha.mean() < 0.5
