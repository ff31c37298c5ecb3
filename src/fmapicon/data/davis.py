"""DAVIS files: the palette, indexed annotation PNGs, the folder layout and sequence lists.

Layout (DAVIS 2016 and 2017 alike)::

    ROOT/JPEGImages/480p/<seq>/00000.jpg ...     frames
    ROOT/Annotations/480p/<seq>/00000.png ...    object ids per pixel
    ROOT/ImageSets/2017/<set>.txt                one sequence name per line (2017)
    ROOT/ImageSets/<set>.txt                     the same (2016 style, e.g. dev.txt)

Annotations come in two styles and both are read as ``H x W`` uint8 object ids:
DAVIS-2017 indexed (palette) PNGs with ids 1..K (255 = void), and DAVIS-2016
grayscale PNGs with 0 = background and 255 = the single object, read as id 1.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fmapicon.errors import UserError
from fmapicon.paths import display_path, visible_entries, visible_files, visible_folders

VOID = 255
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


def davis_palette() -> np.ndarray:
    """The DAVIS (PASCAL VOC) palette: 256 x 3 uint8, id 0 black, 1 (128, 0, 0), 2 (0, 128, 0), ...

    Colour k spreads the bits of k over the high bits of R, G and B, three at a time.
    """
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, red, green, blue = index, 0, 0, 0
        for shift in range(7, -1, -1):
            red |= ((value >> 0) & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (red, green, blue)
    return palette


def write_indexed_png(path, ids: np.ndarray) -> None:
    """Write an ``H x W`` array of object ids as an indexed PNG in the DAVIS palette."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"object ids must be H x W, got shape {ids.shape}")
    if ids.min(initial=0) < 0 or ids.max(initial=0) > 255:
        raise ValueError(f"object ids must be in 0..255, got {ids.min()}..{ids.max()}")
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette(davis_palette().reshape(-1).tolist())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# --------------------------------------------------------------------------- reading masks

# a colour this close (largest channel difference) to a palette colour is that colour:
# the DAVIS palette's colours differ by at least 32 in some channel
COLOUR_TOLERANCE = 15
GREY_MODES = ("L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")


@dataclass(frozen=True)
class AnnotationStyle:
    """How the annotation files of ONE sequence are read, decided once for all its frames.

    grey : ``"ids"`` (grey level = object id, 255 = void), ``"binary"`` (DAVIS-2016 0/255
        masks: grey >= 128 is object 1, so an anti-aliased rim is thresholded at 50%), or
        None (decide from the file alone)
    colours : ``((0xRRGGBB, id), ...)``, the ids of the colours of RGB(A) annotations
    """

    grey: str | None = None
    colours: tuple = ()


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb).astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _load_mask(path: Path) -> tuple[str, np.ndarray]:
    """``(kind, values)`` of a mask file: ``"ids"`` (``H x W`` ids), ``"grey"`` (``H x W``
    0..255 levels), ``"binary"`` (``H x W`` 0/255, known to be a two-level mask) or
    ``"rgb"`` (``H x W`` packed 0xRRGGBB). Transparent pixels (alpha < 128) are background."""
    if not path.is_file():
        raise FileNotFoundError(f"no annotation file at {path}: give the path of an existing mask (PNG)")
    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode not in ("P", "PA", "1", "RGB", "RGBA", *GREY_MODES):
                raise UserError(f"annotation {path} is a {mode!r} image: masks must be indexed (P) PNGs in the "
                                "DAVIS palette, grayscale ids (L), 0/255 masks or RGB(A) colours; "
                                "save it as an indexed PNG")
            array = np.array(image)
            lossy = image.format == "JPEG"
    except OSError as error:
        raise UserError(f"cannot read annotation {path}: {error}") from error
    if lossy:                  # JPEG: levels and colours change along every edge; only a 0/255 mask survives
        if mode == "RGB":
            spread = array.max(axis=-1).astype(np.int16) - array.min(axis=-1)
            if spread.max() > COLOUR_TOLERANCE:
                raise UserError(f"annotation {path} is a colour JPEG: its lossy compression adds colours along "
                                "every edge, so objects cannot be told apart by colour; save the mask as a PNG "
                                "(indexed, DAVIS palette)")
            array = array[..., 0]
        return "binary", array.astype(np.uint8)
    opaque = None
    if mode in ("PA", "LA", "RGBA"):
        opaque = array[..., -1] >= 128
        array = array[..., 0] if mode in ("PA", "LA") else array[..., :3]
    if mode in ("P", "PA", "1"):
        values, kind = array.astype(np.uint8), "ids"
    elif mode in ("RGB", "RGBA"):
        values, kind = _pack(array), "rgb"
    else:
        values, kind = _grey_levels(array, mode, path)
    if opaque is not None:
        values = np.where(opaque, values, 0)
    return kind, values


def _grey_levels(array: np.ndarray, mode: str, path: Path) -> tuple[np.ndarray, str]:
    """8-bit levels of a grayscale mask of any depth, or a refusal naming the file."""
    array = np.asarray(array)
    if array.size == 0:
        return array.astype(np.uint8), "grey"
    if mode == "F":
        if not np.all(np.isfinite(array)):
            raise UserError(f"annotation {path} (mode 'F', 32-bit float) holds NaN or infinite values: "
                            "save the mask as an 8-bit indexed or grayscale PNG")
        if array.min() >= 0 and array.max() <= 1 and not np.all(array == np.round(array)):
            # a soft mask in [0, 1]: the object is where it is at least one half
            return np.where(array >= 0.5, 255, 0).astype(np.uint8), "binary"
        if not np.all(array == np.round(array)):
            raise UserError(f"annotation {path} (mode 'F', 32-bit float) holds values {float(array.min()):g}.."
                            f"{float(array.max()):g} that are neither ids nor a [0, 1] mask: save the mask as "
                            "an 8-bit indexed or grayscale PNG")
    levels = np.unique(array)
    if levels.min() < 0:
        raise UserError(f"annotation {path} (mode {mode!r}) holds negative values (down to {levels.min():g}): "
                        "expected object ids 0..255; save it as an 8-bit indexed PNG")
    if levels.max() > VOID:
        nonzero = levels[levels != 0]
        full = int(nonzero[0]) if len(nonzero) == 1 else 0
        if full & (full + 1) == 0:  # a two-level mask 0 / 2^k - 1 at another depth (e.g. 0/65535)
            return np.where(array != 0, 255, 0).astype(np.uint8), "binary"
        raise UserError(f"annotation {path} (mode {mode!r}): grayscale mask values go up to {int(levels.max())}, "
                        "expected 0..255 (object ids, 0/255 for DAVIS-2016, or 0 and the depth's full value): save it as an 8-bit "
                        "PNG")
    return array.astype(np.uint8), "grey"


def _grey_style(levels: list[np.ndarray]) -> str:
    """``"binary"`` when 255 is the commonest non-zero level of the sequence (DAVIS-2016
    0/255 masks, with or without an anti-aliased rim), else ``"ids"`` (where 255 is void:
    a thin rim around objects that are far larger)."""
    full = sum(int(np.count_nonzero(g == VOID)) for g in levels)
    between = sum(int(np.count_nonzero((g != 0) & (g != VOID))) for g in levels)
    return "binary" if full > 0 and full >= between else "ids"


def _colour_ids(codes: list[np.ndarray], paths) -> tuple:
    """The id of every colour of a sequence's RGB(A) annotations: ``((code, id), ...)``.

    Black is background. When every colour is a DAVIS palette colour, or within
    ``COLOUR_TOLERANCE`` of one (resampling artefacts), the colours are the palette's ids.
    Otherwise each distinct colour is its own object: a colour within the tolerance of a
    commoner colour joins it, and ids 1, 2, ... follow the colours' first appearance (the
    first frame in raster order, then later frames), the same for every frame.
    """
    palette = davis_palette().astype(np.int64)
    exact = {int(c): i for i, c in enumerate(_pack(palette))}
    order, counts = [], {}
    for code in codes:
        values, first, number = np.unique(code.reshape(-1), return_index=True, return_counts=True)
        for v in values[np.argsort(first)]:
            if int(v) not in counts:
                order.append(int(v))
        for v, n in zip(values, number):
            counts[int(v)] = counts.get(int(v), 0) + int(n)
    colours = [c for c in order if c != 0]
    rgb = {c: np.array([(c >> 16) & 255, (c >> 8) & 255, c & 255]) for c in colours}
    nearest = {}
    for c in colours:
        distance = np.abs(palette - rgb[c]).max(axis=1)
        if distance.min() <= COLOUR_TOLERANCE:
            nearest[c] = int(np.argmin(distance))
    if len(nearest) == len(colours):
        mapping = tuple((c, nearest[c]) for c in colours)
        snapped = [c for c in colours if c not in exact]
        if snapped:
            warnings.warn(f"{_where(paths)}: {len(snapped)} colour(s) not in the DAVIS palette "
                          f"(e.g. #{snapped[0]:06x}) read as the nearest palette colour's id")
        return mapping
    # colours that are no palette colour: each distinct colour (up to small deviations) is an object
    leaders = []
    for c in sorted(colours, key=lambda c: -counts[c]):
        near = [l for l in leaders if np.abs(rgb[l] - rgb[c]).max() <= COLOUR_TOLERANCE]
        if not near:
            leaders.append(c)
    join = {}
    for c in colours:
        join[c] = c if c in leaders else min(
            (l for l in leaders if np.abs(rgb[l] - rgb[c]).max() <= COLOUR_TOLERANCE), key=lambda l: -counts[l])
    ids = {}
    for c in colours:
        if join[c] not in ids:
            ids[join[c]] = len(ids) + 1
    if len(ids) > VOID - 1:
        raise UserError(f"annotations in {_where(paths)} hold {len(ids)} distinct colours: at most 254 "
                        "objects fit; save them as indexed PNGs with the object ids")
    warnings.warn(f"{_where(paths)}: RGB annotations in colours outside the DAVIS palette; "
                  f"{len(ids)} object(s) by colour in order of appearance: "
                  + ", ".join(f"#{c:06x}->{i}" for c, i in ids.items()))
    return tuple((c, ids[join[c]]) for c in colours)


def _where(paths) -> str:
    """The file of a one-file read, else the folder of a sequence's annotations."""
    return str(Path(paths[0]) if len(paths) == 1 else Path(paths[0]).parent)


def annotation_style(paths) -> AnnotationStyle:
    """Decide how a sequence's annotation files are read (see ``AnnotationStyle``)."""
    loaded = [_load_mask(Path(p)) for p in paths]
    return _style_of(loaded, paths)


def _style_of(loaded, paths) -> AnnotationStyle:
    grey = [v for kind, v in loaded if kind == "grey"]
    rgb = [v for kind, v in loaded if kind == "rgb"]
    return AnnotationStyle(grey=_grey_style(grey) if grey else None,
                           colours=_colour_ids(rgb, paths) if rgb else ())


def _to_ids(kind: str, values: np.ndarray, style: AnnotationStyle, path: Path) -> np.ndarray:
    if kind == "ids":
        return values
    if kind == "binary":
        return (values >= 128).astype(np.uint8)
    if kind == "grey":
        grey = style.grey or _grey_style([values])
        return (values >= 128).astype(np.uint8) if grey == "binary" else values
    colours = dict(style.colours)
    unique, inverse = np.unique(values, return_inverse=True)
    missing = [int(c) for c in unique if int(c) != 0 and int(c) not in colours]
    if missing:
        style = AnnotationStyle(colours=style.colours + _colour_ids([values], [path]))
        colours = dict(style.colours)
    table = np.array([0 if int(c) == 0 else colours[int(c)] for c in unique], dtype=np.uint8)
    return table[inverse].reshape(values.shape)


def read_annotation(path, style: AnnotationStyle | None = None) -> np.ndarray:
    """Read a DAVIS annotation (or a prediction) as ``H x W`` uint8 object ids.

    - palette PNGs ("P", "PA") keep their indices: ids 1..K, 0 background, 255 void;
      "1" (bilevel) is object 1;
    - grayscale ("L", "LA", "I;16", "I", "F"): grey level = id (255 void), or for DAVIS-2016
      0/255 masks grey >= 128 = object 1; which of the two is decided per sequence by
      ``style`` (``annotation_style``), or from this file when None; a 16-bit 0/65535 mask is
      0/255, a float mask in [0, 1] is thresholded at 0.5;
    - RGB(A): colours -> ids as ``AnnotationStyle.colours`` (see ``_colour_ids``);
    - alpha (LA, PA, RGBA): transparent (alpha < 128) pixels are background;
    - a JPEG (lossy) is a 0/255 mask, grey >= 128 = object 1; a colour JPEG is refused.

    Raises UserError naming the file and its mode for what cannot be read as a mask
    (CMYK, YCbCr, values beyond 255 that are not a two-level mask, ...).
    """
    path = Path(path)
    kind, values = _load_mask(path)
    if style is None:
        style = _style_of([(kind, values)], [path])
    return _to_ids(kind, values, style, path)


def read_annotations(paths) -> tuple[list[np.ndarray], AnnotationStyle]:
    """The ``H x W`` uint8 ids of every annotation of one sequence, all read with one style
    (decided over the whole sequence, never per frame), and that style."""
    paths = [Path(p) for p in paths]
    loaded = [_load_mask(p) for p in paths]
    style = _style_of(loaded, paths)
    return [_to_ids(kind, values, style, p) for (kind, values), p in zip(loaded, paths)], style


def read_frames(paths) -> np.ndarray:
    """Frames ``T x H x W x 3`` uint8 (``fmapicon.data.images.read_image``); all must have the
    same size."""
    from fmapicon.data.images import read_image

    frames = [read_image(p) for p in paths]
    sizes = {f.shape for f in frames}
    if len(sizes) > 1:
        raise UserError(f"frames of one sequence differ in size ({sorted(sizes)}), e.g. {paths[0]}")
    return np.stack(frames)


# --------------------------------------------------------------------------- layout


def layout(root, resolution: str = "480p") -> tuple[Path, Path]:
    """``(images_dir, annotations_dir)`` of a DAVIS root, e.g. ``ROOT/JPEGImages/480p``.

    Without the resolution folder, sequences directly under ``JPEGImages/`` and
    ``Annotations/`` are accepted too. Raises UserError when the folders are missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"DAVIS root {display_path(root)} is not a folder: pass --davis the folder that holds "
                        "JPEGImages/ and Annotations/")
    found = []
    for name in ("JPEGImages", "Annotations"):
        folder = root / name
        if not folder.is_dir():
            raise UserError(f"{display_path(root)} is not a DAVIS root: expected "
                            f"{display_path(root / name)}/{resolution}/<sequence>/ (JPEGImages with the frames, "
                            f"Annotations with the masks); it holds "
                            f"{[display_path(p.name) for p in sorted(visible_entries(root), key=lambda e: e.name)][:8]}")
        found.append(folder / resolution if (folder / resolution).is_dir() else folder)
    return found[0], found[1]


def image_set_path(root, set_name: str) -> Path | None:
    """``ImageSets/2017/<set>.txt`` if present, else ``ImageSets/<set>.txt``, else None."""
    root = Path(root)
    for candidate in (root / "ImageSets" / "2017" / f"{set_name}.txt", root / "ImageSets" / f"{set_name}.txt"):
        if candidate.is_file():
            return candidate
    return None


def available_sets(root) -> list[str]:
    """Names of the sequence lists under ``ROOT/ImageSets`` (and its 2017 folder)."""
    folder = Path(root) / "ImageSets"
    lists = visible_files(folder, (".txt",)) + visible_files(folder / "2017", (".txt",))
    return sorted({p.stem for p in lists})


def resolve_set(root, set_name: str | None, option: str = "--set") -> str:
    """``set_name``, else ``val`` when the root has it (or has no lists), else its only list;
    a root with several lists and no ``val`` needs a choice (``option`` names the flag)."""
    if set_name:
        return set_name
    sets = available_sets(root)
    if "val" in sets or not sets:
        return "val"
    if len(sets) == 1:
        return sets[0]
    raise UserError(f"{root} has several sequence lists ({', '.join(sets)}) and no val: pick one with {option}")


def sequence_names(root, set_name: str | None = None, sequences=None) -> list[str]:
    """The sequences to use, each once: ``sequences`` (a list or "a,b,c") when given, else the
    list of ``set_name`` (None: ``resolve_set``'s default; read by ``read_sequence_list``).

    A name given twice is used once (the official toolkit keeps the sequences in a dict), with
    one warning. Every name must have a frame folder; raises UserError naming what is missing.
    """
    images_dir, _ = layout(root)
    source = "--sequences"
    if sequences:
        names = sequences.split(",") if isinstance(sequences, str) else list(sequences)
        names = [n.strip() for n in names if n.strip()]
    else:
        set_name = resolve_set(root, set_name)
        path = image_set_path(root, set_name)
        if path is None:
            raise UserError(f"no sequence list for set {set_name!r} in {display_path(Path(root) / 'ImageSets')} "
                            f"(looked for 2017/{set_name}.txt and {set_name}.txt); available sets: "
                            f"{available_sets(root) or 'none'}; pass --set NAME or --sequences a,b,c")
        names, source = read_sequence_list(path, images_dir), display_path(path)
    names = _once(names, source)
    if not names:
        raise UserError(f"no sequences selected in {display_path(root)} ({source} names none)")
    missing = [n for n in names if not (images_dir / n).is_dir()]
    if missing:
        shown = ", ".join(display_path(n) for n in missing[:5]) + (", ..." if len(missing) > 5 else "")
        present = ", ".join(display_path(p.name) for p in visible_folders(images_dir)[:5]) or "none"
        raise UserError(f"{len(missing)} sequence(s) named by {source} have no frame folder under "
                        f"{display_path(images_dir)}: {shown} (folders there: {present}); fix the list or "
                        "pass --sequences with names that exist")
    return names


def _once(names: list[str], source: str) -> list[str]:
    """``names`` without repeats (first place kept), with one warning naming the repeats."""
    unique = list(dict.fromkeys(names))
    if len(unique) < len(names):
        repeated = [n for n in unique if names.count(n) > 1]
        warnings.warn(f"{source} names {', '.join(display_path(n) for n in repeated)} more than once: "
                      "each sequence is evaluated and scored once")
    return unique


def read_sequence_list(path, images_dir=None) -> list[str]:
    """The names of a sequence list, one per line (blank lines skipped, spaces trimmed).

    Read as UTF-8, with or without a byte-order mark (UTF-16 with its mark too). A line that is
    not UTF-8 is a name in bytes, read as the file system reads names (``os.fsdecode``), so it
    matches a folder of the same bytes; where no such folder exists under ``images_dir`` but
    one of its Windows-1252 reading does, that one. Raises UserError for a file that is not
    text (NUL bytes: UTF-16 without a mark), naming it.
    """
    import codecs

    path = Path(path)
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raw = raw.decode("utf-16").encode("utf-8", errors="surrogateescape")
    raw = raw[len(codecs.BOM_UTF8):] if raw.startswith(codecs.BOM_UTF8) else raw
    if b"\0" in raw:
        raise UserError(f"sequence list {display_path(path)} is not a text file of names (it holds NUL bytes: "
                        "UTF-16 without a byte-order mark?): save it as UTF-8, one sequence name per line")
    return [_list_name(line.strip(), images_dir) for line in raw.splitlines() if line.strip()]


def _list_name(line: bytes, images_dir) -> str:
    name = os.fsdecode(line)
    if images_dir is None or (Path(images_dir) / name).is_dir():
        return name
    try:
        line.decode("utf-8")
        return name
    except UnicodeDecodeError:
        other = line.decode("cp1252", errors="replace")
        return other if (Path(images_dir) / other).is_dir() else name


def frame_paths(images_dir, sequence: str) -> list[Path]:
    """The frames of a sequence in natural order (``fmapicon.data.sources.natural_key``: 2.jpg
    before 10.jpg); hidden files (``fmapicon.paths.is_hidden``: ``._00000.jpg``) are no frames."""
    from fmapicon.data.sources import natural_sorted

    folder = Path(images_dir) / sequence
    paths = natural_sorted(visible_files(folder, FRAME_SUFFIXES))
    if not paths:
        raise UserError(f"no frames (.jpg/.png) in {display_path(folder)}")
    return paths


def annotation_paths(annotations_dir, sequence: str) -> list[Path]:
    """The annotation PNGs of a sequence in natural order (``fmapicon.data.sources.natural_key``;
    for zero-padded names, as DAVIS's, the toolkit's string order); hidden files are skipped."""
    from fmapicon.data.sources import natural_sorted

    folder = Path(annotations_dir) / sequence
    paths = natural_sorted(visible_files(folder, (".png",)))
    if not paths:
        raise UserError(f"no annotations (*.png) in {display_path(folder)}: the ground truth of sequence "
                        f"{display_path(sequence)!r} is missing")
    return paths
