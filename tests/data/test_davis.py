"""DAVIS files: palette, annotation styles, layout and sequence lists."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fmapicon.data.davis import (annotation_paths, available_sets, davis_palette, frame_paths, layout,
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


def test_a_colour_jpeg_is_refused_and_a_grey_one_is_a_mask(tmp_path):
    mask = np.zeros((32, 48), np.uint8)
    mask[8:24, 10:30] = 255
    Image.fromarray(mask).convert("RGB").save(tmp_path / "grey.jpg", quality=70)
    assert np.array_equal(read_annotation(tmp_path / "grey.jpg"), (mask == 255).astype(np.uint8))
    photo = np.random.default_rng(0).integers(0, 256, size=(32, 48, 3)).astype(np.uint8)
    Image.fromarray(photo).save(tmp_path / "frame.jpg")
    with pytest.raises(UserError, match=r"frame.jpg is a colour JPEG: .* save the mask as a PNG"):
        read_annotation(tmp_path / "frame.jpg")


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


# --------------------------------------------------------------------------- every mode


def _object(shape=(12, 16)):
    ids = np.zeros(shape, np.uint8)
    ids[3:8, 4:11] = 1
    return ids


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F"])
def test_every_pillow_mode_reads_the_object(tmp_path, mode):
    from fmapicon.data.davis import read_annotation

    ids = _object()
    palette = davis_palette()
    if mode == "1":
        image = Image.fromarray(ids.astype(bool))
    elif mode in ("L", "I;16", "I", "F"):
        image = Image.fromarray((ids * 255).astype(np.uint8), "L").convert(mode if mode != "I;16" else "I")
        if mode == "I;16":
            image = Image.fromarray((ids.astype(np.uint16) * 65535))
    elif mode == "LA":
        image = Image.fromarray(np.stack([ids * 255, np.full_like(ids, 255)], -1).astype(np.uint8), "LA")
    elif mode in ("P", "PA"):
        image = Image.fromarray(ids, "P")
        image.putpalette(palette.reshape(-1).tolist())
        if mode == "PA":
            image = image.convert("PA")
    else:
        rgb = palette[ids]
        image = Image.fromarray(rgb) if mode == "RGB" else Image.fromarray(
            np.concatenate([rgb, np.full(ids.shape + (1,), 255, np.uint8)], -1), "RGBA")
    suffix = ".tif" if mode in ("F", "I") else ".png"
    image.save(tmp_path / f"m{suffix}")
    with Image.open(tmp_path / f"m{suffix}") as check:
        assert check.mode.startswith(mode if mode != "I;16" else "I")
    assert np.array_equal(read_annotation(tmp_path / f"m{suffix}"), ids)


def test_palette_with_alpha_reads_ids_and_transparent_is_background(tmp_path, monkeypatch):
    import fmapicon.data.davis as davis

    ids = _object()
    image = Image.fromarray(ids, "P")
    image.putpalette(davis_palette().reshape(-1).tolist())
    image = image.convert("PA")  # no file format writes PA: hand the reader the image itself
    alpha = np.full(ids.shape, 255, np.uint8)
    alpha[3, 4] = 0                                  # one transparent object pixel
    image.putalpha(Image.fromarray(alpha, "L"))
    (tmp_path / "m.png").write_bytes(b"")
    monkeypatch.setattr(davis.Image, "open", lambda path: image)
    expected = ids.copy()
    expected[3, 4] = 0
    assert np.array_equal(davis.read_annotation(tmp_path / "m.png"), expected)


def test_cmyk_annotation_is_refused_naming_file_and_mode(tmp_path):
    from fmapicon.data.davis import read_annotation

    Image.fromarray(davis_palette()[_object()]).convert("CMYK").save(tmp_path / "m.jpg")
    with pytest.raises(UserError, match=r"m\.jpg is a 'CMYK' image.*indexed PNG"):
        read_annotation(tmp_path / "m.jpg")


def test_rgba_transparent_background_is_background(tmp_path):
    from fmapicon.data.davis import read_annotation

    ids = _object()
    rgba = np.zeros(ids.shape + (4,), np.uint8)
    rgba[...] = (255, 255, 255, 0)                   # white, fully transparent
    rgba[ids == 1] = (128, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "m.png")
    assert np.array_equal(read_annotation(tmp_path / "m.png"), ids)


def _rgb_sequence(tmp_path, colours, stray=None, frames=3):
    ids = np.zeros((10, 20), np.uint8)
    ids[2:6, 2:7], ids[2:6, 10:16] = 1, 2
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = []
    for t in range(frames):
        rgb = np.zeros(ids.shape + (3,), np.uint8)
        for k, colour in colours.items():
            rgb[ids == k] = colour
        if stray is not None:
            rgb[9, 19] = stray
        paths.append(tmp_path / f"{t:05d}.png")
        Image.fromarray(rgb).save(paths[-1])
    return ids, paths


def test_rgb_colours_are_never_merged(tmp_path):
    from fmapicon.data.davis import read_annotations

    # stray near-palette pixel: snapped to the nearest palette colour's id
    ids, paths = _rgb_sequence(tmp_path / "stray", {1: (128, 0, 0), 2: (0, 128, 0)}, stray=(129, 1, 0))
    with pytest.warns(UserWarning, match="nearest palette"):
        read, _ = read_annotations(paths)
    expected = ids.copy()
    expected[9, 19] = 1
    assert all(np.array_equal(r, expected) for r in read)
    # colours outside the palette: one object per colour, in order of appearance, same in every frame
    ids, paths = _rgb_sequence(tmp_path / "other", {1: (255, 0, 0), 2: (0, 255, 0)})
    with pytest.warns(UserWarning, match="#ff0000->1, #00ff00->2"):
        read, _ = read_annotations(paths)
    assert all(np.array_equal(r, ids) for r in read)
    # swapped first appearance order gives swapped ids, consistently
    ids, paths = _rgb_sequence(tmp_path / "swap", {1: (0, 255, 0), 2: (255, 0, 0)})
    with pytest.warns(UserWarning):
        read, _ = read_annotations(paths)
    assert np.array_equal(read[-1], ids)


def test_grey_style_is_decided_once_per_sequence(tmp_path):
    from fmapicon.data.davis import read_annotation, read_annotations

    ids = _object((20, 20))
    paths = []
    for t in range(4):
        grey = (ids * 255).astype(np.uint8)
        if t == 2:  # an anti-aliased rim of 128 on one frame
            rim = np.zeros_like(ids, bool)
            rim[2, 4:11] = rim[8, 4:11] = True
            grey[rim] = 128
        paths.append(tmp_path / f"{t:05d}.png")
        Image.fromarray(grey, "L").save(paths[-1])
    read, style = read_annotations(paths)
    assert style.grey == "binary"
    assert set(np.unique(read[2]).tolist()) == {0, 1}        # never id 128, never void
    rim_read = read[2][2, 4:11]
    assert rim_read.tolist() == [1] * 7                        # 128 >= half of 255: object
    assert np.array_equal(read[0], ids)
    # an ids-style sequence keeps 255 as void even on a frame holding only 0 and 255
    Image.fromarray(np.array([[0, 1, 1], [2, 2, 255]], np.uint8), "L").save(tmp_path / "a.png")
    Image.fromarray(np.array([[0, 255, 0], [0, 0, 0]], np.uint8), "L").save(tmp_path / "b.png")
    read, style = read_annotations([tmp_path / "a.png", tmp_path / "b.png"])
    assert style.grey == "ids" and read[1].tolist() == [[0, 255, 0], [0, 0, 0]]
    assert read_annotation(tmp_path / "b.png").tolist() == [[0, 1, 0], [0, 0, 0]]  # alone: 0/255


def test_frames_and_annotations_in_natural_order(tmp_path):
    for name in ("1", "2", "10", "11", "9"):
        for kind in ("frames", "masks"):
            (tmp_path / kind / "seq").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (2, 2)).save(tmp_path / "frames" / "seq" / f"{name}.jpg")
        Image.new("P", (2, 2)).save(tmp_path / "masks" / "seq" / f"{name}.png")
    expected = ["1", "2", "9", "10", "11"]
    assert [p.stem for p in frame_paths(tmp_path / "frames", "seq")] == expected
    assert [p.stem for p in annotation_paths(tmp_path / "masks", "seq")] == expected


def test_sequence_lists_in_other_encodings(tmp_path):
    import os

    root = _tiny_root(tmp_path / "r")
    val = root / "ImageSets" / "2017" / "val.txt"
    val.write_bytes(b"\xef\xbb\xbfa\r\nb\r\n")  # UTF-8 with a byte-order mark, Windows line ends
    assert sequence_names(root, "val") == ["a", "b"]
    val.write_bytes("a\nb\n".encode("utf-16"))  # UTF-16 with its mark
    assert sequence_names(root, "val") == ["a", "b"]
    val.write_bytes("a\nb\n".encode("utf-16-le"))  # without: refused in one line naming the file
    with pytest.raises(UserError, match="val.txt is not a text file of names"):
        sequence_names(root, "val")
    images = root / "JPEGImages" / "480p"
    (images / "b").rename(images / "s\u00e9q")  # a UTF-8 folder named in a Windows (cp1252) list
    val.write_bytes(b"a\ns\xe9q\n")
    assert sequence_names(root, "val") == ["a", "s\u00e9q"]
    (images / "s\u00e9q").rename(images / os.fsdecode(b"s\xe9q"))  # and a folder of the same bytes
    assert sequence_names(root, "val") == ["a", os.fsdecode(b"s\xe9q")]


def test_a_missing_sequence_is_named_plainly(tmp_path):
    import os

    root = _tiny_root(tmp_path / "r")
    (root / "ImageSets" / "2017" / "val.txt").write_bytes(b"a\nn\xe9pe\n")
    with pytest.raises(UserError, match=r"1 sequence\(s\) named by .*val.txt have no frame folder .*: n\\xe9pe "
                                        r"\(folders there: a, b\)"):
        sequence_names(root, "val")
    assert os.fsdecode(b"n\xe9pe")  # the name itself stays the file system's


def test_hidden_files_are_no_frames_annotations_or_sets(tmp_path):
    root = _tiny_root(tmp_path / "r")
    images, annotations = layout(root)
    for folder, name in ((images / "a", "._00000.jpg"), (annotations / "a", "._00000.png"),
                         (root / "ImageSets" / "2017", "._val.txt")):
        (folder / name).write_bytes(b"\0\x05\x16\x07")
    (images / "a" / ".DS_Store").write_bytes(b"\0")
    assert [p.name for p in frame_paths(images, "a")] == ["00000.jpg"]
    assert [p.name for p in annotation_paths(annotations, "a")] == ["00000.png"]
    assert available_sets(root) == ["val"]
