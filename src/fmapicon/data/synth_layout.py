"""Writing synthetic scenes (``fmapicon.data.synth``) in the DAVIS-2017 layout with exact
flow (``Flow/``), videos (``Videos/``) and a marker file (``synth.json``)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from fmapicon.data.synth import Scene, check_counts, check_size, generate_scene, scene_seed, sequence_name
from fmapicon.errors import UserError
from fmapicon.runtime import staged_output

LAYOUT_DIRS = ("JPEGImages", "Annotations", "ImageSets", "Flow", "Videos")
MARKER = "synth.json"
JPEG_QUALITY = 95
VIDEO_FPS = 24


def write_scenes(out, sequences: int = 4, frames: int = 30, size: tuple[int, int] = (256, 256),
                 objects: int = 3, seed: int = 0, set_name: str = "val", video: bool = True,
                 overwrite: bool = False) -> list[str]:
    """Write ``sequences`` scenes in the DAVIS-2017 layout and return their names.

    Layout under ``out``::

        JPEGImages/480p/<seq>/00000.jpg     frames (JPEG quality 95, 4:4:4)
        Annotations/480p/<seq>/00000.png    indexed PNG, DAVIS palette, ids 1..M
        ImageSets/2017/<set_name>.txt       the sequence names
        Flow/<seq>/00000.flo                exact forward flow t -> t+1 (Middlebury, pixels)
        Videos/<seq>.mp4                    H.264, 24 fps (only when ``video``)
        synth.json                          the parameters; "complete": true once all is written

    ("480p" is the layout's folder name; the frames are ``size``.) The same arguments give
    the same bytes on the same installation (the encoder runs single-threaded). A folder
    that already holds files is refused unless ``overwrite``: then a previous synth output
    is replaced once the new one is complete (built aside: ``fmapicon.runtime.staged_output``);
    a folder with other DAVIS-like data is never touched.
    """
    out = Path(out)
    height, width = check_size(size)
    check_counts(frames, objects)
    if sequences < 1:
        raise UserError(f"sequences must be at least 1, got {sequences}")
    if video and (height % 2 or width % 2):
        raise UserError(f"video needs an even size (H.264 4:2:0), got {height} x {width}: "
                        "use an even size or video=False (--no-video)")
    av = None
    if video:
        from fmapicon.runtime import require

        av = require("av")
    _check_output(out, overwrite)
    params = dict(sequences=sequences, frames=frames, size=[height, width], objects=objects, seed=seed,
                  set_name=set_name, video=bool(video))
    names = [sequence_name(i) for i in range(sequences)]
    with staged_output(out, force=overwrite, outputs=(*LAYOUT_DIRS, MARKER), what="the earlier synth output",
                       last=(MARKER,)) as work:
        for index, name in enumerate(names):
            scene = generate_scene(scene_seed(seed, index), frames, (height, width), objects, visibility=False)
            _write_sequence(work, name, scene)
            if av is not None:
                _write_video(av, work / "Videos" / f"{name}.mp4", scene.frames)
        image_set = work / "ImageSets" / "2017" / f"{set_name}.txt"
        image_set.parent.mkdir(parents=True, exist_ok=True)
        image_set.write_text("".join(f"{name}\n" for name in names))
        _write_marker(work, {**params, "complete": True, "names": names})
    return names


def _check_output(out: Path, overwrite: bool) -> None:
    """Refuse to mix with existing files; with ``overwrite`` only a previous synth output is
    replaced (by ``staged_output``, once the new scenes are complete)."""
    from fmapicon.runtime import listed_names

    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder: choose a folder for the synthetic scenes")
    entries = listed_names(out) if out.is_dir() else []
    if not entries:
        return
    is_synth = (out / MARKER).is_file()
    if not overwrite:
        what = "synthetic scenes from an earlier run" if is_synth else f"{len(entries)} entries"
        raise UserError(f"{out} is not empty (it holds {what}); writing would mix old and new files: "
                        "choose an empty folder or pass --force (overwrite=True) to replace a synth output")
    clashes = [name for name in entries if name in LAYOUT_DIRS]
    if clashes and not is_synth:
        raise UserError(f"{out} holds {', '.join(clashes)} that fmapicon synth did not write (no {MARKER}); "
                        "refusing to delete or mix them: choose another folder")


def _write_sequence(out: Path, name: str, scene: Scene) -> None:
    from PIL import Image

    from fmapicon.data.davis import write_indexed_png
    from fmapicon.data.flow import write_flo

    images = out / "JPEGImages" / "480p" / name
    annotations = out / "Annotations" / "480p" / name
    flows = out / "Flow" / name
    for folder in (images, annotations, flows):
        folder.mkdir(parents=True, exist_ok=True)
    for t, frame in enumerate(scene.frames):
        Image.fromarray(frame).save(images / f"{t:05d}.jpg", quality=JPEG_QUALITY, subsampling=0)
        write_indexed_png(annotations / f"{t:05d}.png", scene.masks[t])
    for t, flow in enumerate(scene.flows):
        write_flo(flows / f"{t:05d}.flo", flow)


def _write_video(av, path: Path, frames: np.ndarray) -> None:
    """Encode T x H x W x 3 uint8 frames as an mp4, deterministically (single-threaded encoder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    options = {"threads": "1", "g": "12"}
    if codec == "libx264":
        options.update(crf="16", preset="medium")
    else:
        options.update(qscale="2")
    tmp = path.with_name(f".{path.name}.tmp")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=VIDEO_FPS, options=options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


def _write_marker(out: Path, params: dict) -> None:
    from fmapicon import __version__
    from fmapicon.runtime import write_json

    params = {"generator": "fmapicon synth", "version": __version__, **params}
    write_json(out / MARKER, params)


def read_marker(root) -> dict | None:
    """The parameters of a synth output (its synth.json), or None when ``root`` is not one."""
    path = Path(root) / MARKER
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        warnings.warn(f"cannot read {path}: {error}")
        return None
