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

from pathlib import Path

import numpy as np
from PIL import Image

from fmapicon.errors import UserError

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


def _rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    """Colours of the DAVIS palette -> their ids; any other colour image: non-black -> 1."""
    def pack(colours):
        colours = colours.astype(np.int32)
        return (colours[..., 0] << 16) | (colours[..., 1] << 8) | colours[..., 2]

    code = pack(rgb)
    lookup = {int(c): i for i, c in enumerate(pack(davis_palette()))}
    colours, inverse = np.unique(code, return_inverse=True)
    if all(int(c) in lookup for c in colours):
        ids = np.array([lookup[int(c)] for c in colours], dtype=np.uint8)
        return ids[inverse].reshape(code.shape)
    return (code != 0).astype(np.uint8)


def _grey_to_ids(grey: np.ndarray, path: Path) -> np.ndarray:
    """Grayscale masks: only 0 and 255 -> DAVIS-2016 (255 is the object, id 1); otherwise the
    grey levels are the ids themselves (255 = void)."""
    if grey.size and grey.max() > VOID:
        raise UserError(f"{path}: grayscale mask values go up to {int(grey.max())}, expected 0..255 "
                        "(object ids, or 0/255 for DAVIS-2016): save it as an 8-bit PNG")
    if not np.any((grey != 0) & (grey != VOID)):
        return (grey == VOID).astype(np.uint8)
    return grey.astype(np.uint8)


def read_annotation(path) -> np.ndarray:
    """Read a DAVIS annotation (or a prediction) as ``H x W`` uint8 object ids.

    - palette ("P") PNGs keep their indices: ids 1..K, 0 background, 255 void (DAVIS-2017);
    - grayscale ("L", "LA", "I", "1") with values in {0, 255} is DAVIS-2016: 255 -> id 1;
      other grayscale values are taken as ids;
    - RGB(A) in the DAVIS palette's colours -> their ids, any other colours: non-black -> 1.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no annotation at {path}")
    try:
        with Image.open(path) as image:
            mode = image.mode
            array = np.array(image)
    except OSError as error:
        raise UserError(f"cannot read annotation {path}: {error}") from error
    if mode == "P":
        return array.astype(np.uint8)
    if mode in ("RGB", "RGBA"):
        return _rgb_to_ids(array[..., :3])
    if mode == "LA":  # grey plus alpha: the alpha channel says nothing about the object
        array = array[..., 0]
    if mode == "1":
        return array.astype(np.uint8)
    if array.ndim != 2:
        raise UserError(f"{path}: unsupported mask image mode {mode!r}; expected an indexed (P) or "
                        "grayscale (L) PNG")
    return _grey_to_ids(array, path)


def read_frame(path) -> np.ndarray:
    """An RGB frame as ``H x W x 3`` uint8."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except OSError as error:
        raise UserError(f"cannot read frame {path}: {error}") from error


def read_frames(paths) -> np.ndarray:
    """Frames ``T x H x W x 3`` uint8; all must have the same size."""
    frames = [read_frame(p) for p in paths]
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
        raise UserError(f"DAVIS root {root} is not a folder: pass --davis the folder that holds "
                        "JPEGImages/ and Annotations/")
    found = []
    for name in ("JPEGImages", "Annotations"):
        folder = root / name
        if not folder.is_dir():
            raise UserError(f"{root} is not a DAVIS root: expected {root / name}/{resolution}/<sequence>/ "
                            f"(JPEGImages with the frames, Annotations with the masks); "
                            f"it holds {sorted(p.name for p in root.iterdir())[:8]}")
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
    return sorted({p.stem for p in folder.glob("*.txt")} | {p.stem for p in folder.glob("2017/*.txt")})


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
    """The sequences to use: ``sequences`` (a list or "a,b,c") when given, else the list of
    ``set_name`` (None: ``resolve_set``'s default).

    Every name must have a frame folder; raises UserError naming what is missing.
    """
    images_dir, _ = layout(root)
    if sequences:
        names = sequences.split(",") if isinstance(sequences, str) else list(sequences)
        names = [n.strip() for n in names if n.strip()]
    else:
        set_name = resolve_set(root, set_name)
        path = image_set_path(root, set_name)
        if path is None:
            raise UserError(f"no sequence list for set {set_name!r} in {Path(root) / 'ImageSets'} "
                            f"(looked for 2017/{set_name}.txt and {set_name}.txt); available sets: "
                            f"{available_sets(root) or 'none'}; pass --set NAME or --sequences a,b,c")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    missing = [n for n in names if not (images_dir / n).is_dir()]
    if missing:
        raise UserError(f"sequence(s) {missing[:5]} have no frame folder under {images_dir}")
    if not names:
        raise UserError(f"no sequences selected in {root} (set {set_name!r})")
    return names


def frame_paths(images_dir, sequence: str) -> list[Path]:
    """The frames of a sequence, sorted by name."""
    folder = Path(images_dir) / sequence
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES) if folder.is_dir() else []
    if not paths:
        raise UserError(f"no frames (.jpg/.png) in {folder}")
    return paths


def annotation_paths(annotations_dir, sequence: str) -> list[Path]:
    """The annotation PNGs of a sequence, sorted by name (as the toolkit's glob)."""
    folder = Path(annotations_dir) / sequence
    paths = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not paths:
        raise UserError(f"no annotations (*.png) in {folder}: the ground truth of sequence {sequence!r} is missing")
    return paths
