"""Frame pairs: the right frames, the gap, the crop, bad files, the index cache, determinism."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fmapicon.data.sources as sources
from fmapicon.data.pairs import MAX_ATTEMPTS, FramePairs, parse_synth, synth_scene_seed
from fmapicon.data.sources import SkippedFileWarning, read_video_pair
from fmapicon.errors import UserError


def write_video(path: Path, frames: np.ndarray, gop: int = 12, faststart: bool = False) -> Path:
    """T x H x W x 3 uint8 -> an H.264 mp4 with a keyframe every ``gop`` frames."""
    av = pytest.importorskip("av")
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), mode="w", format="mp4", options=options) as container:
        stream = container.add_stream("libx264", rate=24, options={"crf": "12", "g": str(gop), "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def numbered_frames(count: int, size: int = 32) -> np.ndarray:
    """Flat frames whose colour encodes their index k: red 20 + 6 (k mod 30), green 20 + 40 (k div 30)
    (steps wide enough for the codec's colour error of about 2 grey levels)."""
    index = np.arange(count)
    colours = np.stack([20 + 6 * (index % 30), 20 + 40 * (index // 30), np.full(count, 128)], 1)
    return np.broadcast_to(colours[:, None, None, :], (count, size, size, 3)).astype(np.uint8).copy()


def frame_number(image) -> int:
    """Invert ``numbered_frames`` for a decoded PIL image or a 3 x S x S tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        red, green, _ = np.asarray(image, dtype=np.float32).mean(axis=(0, 1))
    else:
        red, green, _ = (image.mean(dim=(1, 2)) * 255).tolist()
    return int(round((red - 20) / 6)) + 30 * int(round((green - 20) / 40))


def write_jpegs(folder: Path, frames: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{t:05d}.jpg", quality=95)
    return folder


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


# ---------------------------------------------------------------------------------------
# frame folders and videos


def test_davis_layout_frames(synth_root, cache):
    """A DAVIS root gives one clip per JPEGImages sequence (annotations are not clips)."""
    pairs = FramePairs(synth_root, size=48, max_gap=5, cache_dir=cache)
    assert pairs.summary["clips"] == 3 and pairs.summary["by_kind"] == {"frames": 3}
    assert pairs.summary["frames"] == 36 and len(pairs) == 33
    assert pairs.scale == pytest.approx(0.5)
    a, b = pairs[0]
    assert a.shape == b.shape == (3, 48, 48) and a.dtype == torch.float32
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0 and float(a.std()) > 0.05


def test_gap_is_within_max_gap_and_uniform(synth_root, cache):
    pairs = FramePairs(synth_root, size=32, max_gap=5, cache_dir=cache, length=3000)
    gaps = np.array([b - a for _, a, b in map(pairs.pair_indices, range(3000))])
    assert gaps.min() == 1 and gaps.max() == 5
    assert np.allclose(np.bincount(gaps)[1:] / len(gaps), 0.2, atol=0.03), "uniform over 1..max_gap"
    for index in range(0, 3000, 300):
        pair = pairs.load(index)
        assert 1 <= pair.index_b - pair.index_a <= 5 and pair.index_b < 12


def test_gap_is_clipped_to_short_clips(tmp_path, cache):
    write_jpegs(tmp_path / "short", numbered_frames(4))
    pairs = FramePairs(tmp_path / "short", size=16, max_gap=30, cache_dir=cache, length=200)
    for index in range(200):
        _, a, b = pairs.pair_indices(index)
        assert 0 <= a < b <= 3


def test_pairs_hold_the_drawn_frames(tmp_path, cache):
    """The decoded A and B are the frames the dataset says (video and folder alike)."""
    frames = numbered_frames(40)
    write_jpegs(tmp_path / "folder" / "clip", frames)
    write_video(tmp_path / "clip.mp4", frames, gop=8)
    for source in (tmp_path / "folder", tmp_path / "clip.mp4"):
        pairs = FramePairs(source, size=16, max_gap=30, cache_dir=cache)
        for index in range(0, len(pairs), 5):
            pair = pairs.load(index)
            assert (frame_number(pair.a), frame_number(pair.b)) == (pair.index_a, pair.index_b), source


def test_video_and_frames_give_the_same_pairs(synth_root, cache):
    """Videos/<seq>.mp4 and JPEGImages/<seq> hold the same frames: same draws, same pixels
    within codec tolerance, and clearly closer than the other frame of the pair."""
    pytest.importorskip("av")
    videos = FramePairs(synth_root / "Videos", size=64, cache_dir=cache)
    folders = FramePairs(synth_root / "JPEGImages", size=64, cache_dir=cache)
    assert [Path(c.path).stem for c in videos.clips] == [Path(c.path).name for c in folders.clips]
    for index in range(0, len(videos), 4):
        from_video, from_folder = videos.load(index), folders.load(index)
        assert (from_video.index_a, from_video.index_b) == (from_folder.index_a, from_folder.index_b)
        same = (from_video.a - from_folder.a).abs().mean()
        assert same < 0.03
        assert same < (from_video.a - from_folder.b).abs().mean()


def test_seek_decodes_a_gop_not_the_video(tmp_path, monkeypatch):
    """Reading frames 190 and 195 of a 200-frame video decodes about a GOP plus the gap."""
    path = write_video(tmp_path / "long.mp4", numbered_frames(120), gop=10)
    decoded = []
    real_open = sources._open_video

    class Counting:
        def __init__(self, container):
            self.container = container

        def __getattr__(self, name):
            return getattr(self.container, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.container.__exit__(*exc)

        def decode(self, *args, **kwargs):
            for frame in self.container.decode(*args, **kwargs):
                decoded.append(frame)
                yield frame

    monkeypatch.setattr(sources, "_open_video", lambda p: Counting(real_open(p)))
    image_a, image_b, b = read_video_pair(path, 110, 115)
    assert (frame_number(image_a), frame_number(image_b), b) == (110, 115, 115)
    assert len(decoded) <= 10 + 6 + 4, f"decoded {len(decoded)} frames"


def test_random_crop_is_shared_by_a_and_b(tmp_path, cache):
    """On a still scene A and B are identical under any crop; random crops differ from the centre."""
    rng = np.random.default_rng(0)
    still = np.repeat(rng.integers(0, 255, (1, 40, 60, 3), dtype=np.uint8), 6, axis=0)
    write_jpegs(tmp_path / "still", still)
    centre = FramePairs(tmp_path / "still", size=16, cache_dir=cache)
    random = FramePairs(tmp_path / "still", size=16, crop="random", cache_dir=cache, length=20)
    first = random[0][0]
    assert not torch.equal(first, centre[0][0])
    for index in range(20):
        a, b = random[index]
        assert torch.equal(a, b)
    assert torch.equal(first, FramePairs(tmp_path / "still", size=16, crop="random", cache_dir=cache)[0][0])


def test_real_davis_frames(davis2016_root, cache):
    pairs = FramePairs(davis2016_root, size=120, cache_dir=cache)
    sequences = (davis2016_root / "ImageSets" / "dev.txt").read_text().split()
    assert sorted(Path(c.path).name for c in pairs.clips) == sorted(sequences)
    on_disk = len(list((davis2016_root / "JPEGImages" / "480p").glob("*/*.jpg")))
    assert pairs.summary["frames"] == on_disk
    assert pairs.scale == pytest.approx(0.25), "854 x 480 -> 120: the 480 side shrinks 4 times"
    assert pairs.input_scale == pairs.scale, "centre crops: evaluation at the crop's own scale"
    a, b = pairs[7]
    assert a.shape == (3, 120, 120) and float(a.std()) > 0.05
    # random crops of 0.07 to 0.1 of the 480 side shown at 32 pixels: 32 / (480 * 0.0837) = 0.80,
    # where the centre crop's 32 / 480 = 0.067 would run the model twelve times too small
    native = FramePairs(davis2016_root, size=32, crop="random", crop_scale=(0.07, 0.1), cache_dir=cache)
    assert native.input_scale == pytest.approx(32 / (480 * (0.07 * 0.1) ** 0.5))
    assert native.summary["scale"]["input_scale"] == native.input_scale


# ---------------------------------------------------------------------------------------
# bad files


def _messy_folder(root: Path, synth_root: Path) -> Path:
    messy = root / "messy"
    messy.mkdir()
    good = synth_root / "Videos" / "synth-0000.mp4"
    shutil.copy(good, messy / "good.mp4")
    (messy / "empty.mp4").write_bytes(b"")
    (messy / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (messy / "text.mp4").write_text("this is not a video\n")
    write_video(messy / "one_frame.mp4", numbered_frames(1))
    frames = write_jpegs(messy / "frames", numbered_frames(5))
    (frames / "00005.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    write_jpegs(messy / "single", numbered_frames(1))
    (messy / "notes.txt").write_text("ignored")
    return messy


def test_bad_files_are_skipped_and_counted(tmp_path, synth_root, cache):
    pytest.importorskip("av")
    messy = _messy_folder(tmp_path, synth_root)
    with pytest.warns(SkippedFileWarning) as caught:
        pairs = FramePairs(messy, size=16, cache_dir=cache)
    assert pairs.summary["clips"] == 2
    assert pairs.summary["skipped"] == {"zero_bytes": 1, "unreadable_video": 2, "too_short": 2,
                                        "unreadable_image": 1}
    assert pairs.summary["other_files"] == 1
    warned = [str(w.message) for w in caught if issubclass(w.category, SkippedFileWarning)]
    assert len(warned) == 6, "one warning per bad file"
    for name in ("empty.mp4", "truncated.mp4", "text.mp4", "one_frame.mp4", "00005.jpg", "single"):
        assert sum(name in message for message in warned) == 1, name
    # the second start reads the verdicts from the index and still warns and counts
    with pytest.warns(SkippedFileWarning):
        again = FramePairs(messy, size=16, cache_dir=cache)
    assert again.summary["skipped"] == pairs.summary["skipped"] and again.summary["index"]["misses"] == 0
    for index in range(0, len(pairs), 7):
        pairs[index]


def test_a_source_without_clips_raises(tmp_path, cache):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "text.mp4").write_text("no")
    with pytest.warns(SkippedFileWarning), pytest.raises(UserError, match="no usable clip") as error:
        FramePairs(bad, cache_dir=cache)
    assert str(bad) in str(error.value) and "zero bytes" in str(error.value)
    with pytest.raises(UserError, match="does not exist"):
        FramePairs(tmp_path / "missing", cache_dir=cache)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="no video or image files"):
        FramePairs(tmp_path / "nothing", cache_dir=cache)


def test_frame_count_from_metadata_too_high(tmp_path, cache):
    """A truncated fast-start mp4 promises 60 frames but decodes fewer: pairs near the end
    fall back to the last decodable frame, and a pair that cannot decode is redrawn."""
    full = write_video(tmp_path / "full.mp4", numbered_frames(60), gop=6, faststart=True)
    broken = tmp_path / "broken" / "cut.mp4"
    broken.parent.mkdir()
    av = pytest.importorskip("av")
    with av.open(str(full)) as container:  # cut the file in the middle of packet 35
        positions = sorted(packet.pos for packet in container.demux(video=0) if packet.size)
    broken.write_bytes(full.read_bytes()[: positions[35] + 5])
    image_a, image_b, b = read_video_pair(broken, 10, 59)
    assert frame_number(image_a) == 10 and 10 < b < 59 and frame_number(image_b) == b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedFileWarning)
        pairs = FramePairs(broken.parent, size=16, cache_dir=cache)
        assert pairs.clips[0].frames == 60
        loaded = [pairs.load(index) for index in range(len(pairs))]
    assert all(frame_number(p.a) == p.index_a and frame_number(p.b) == p.index_b for p in loaded)
    assert pairs.summary["fallbacks"] > 0 and pairs.summary["decode_failures"] > 0


def test_decode_error_during_training_skips_the_pair(tmp_path, cache):
    frames = numbered_frames(20)
    (tmp_path / "videos").mkdir()
    write_video(tmp_path / "videos" / "a.mp4", frames)
    write_video(tmp_path / "videos" / "b.mp4", frames)
    pairs = FramePairs(tmp_path / "videos", size=16, cache_dir=cache)
    (tmp_path / "videos" / "b.mp4").write_bytes(b"corrupted after the start")
    with pytest.warns(SkippedFileWarning, match="b.mp4"):
        loaded = [pairs.load(index) for index in range(len(pairs))]
    assert {Path(p.clip).name for p in loaded} == {"a.mp4"}
    assert pairs.summary["decode_failures"] >= 1
    assert any(p.attempts > 0 for p in loaded)


def test_all_pairs_failing_stops_with_a_clear_error(tmp_path, cache):
    """If every redraw fails (all data broken after the start), the error says so instead of looping."""
    write_jpegs(tmp_path / "frames", numbered_frames(6))
    pairs = FramePairs(tmp_path / "frames", size=16, cache_dir=cache)
    for path in (tmp_path / "frames").iterdir():
        path.write_bytes(b"")
    with pytest.warns(SkippedFileWarning), pytest.raises(UserError, match="mostly unreadable"):
        pairs.load(0)
    assert pairs.summary["decode_failures"] == MAX_ATTEMPTS


# ---------------------------------------------------------------------------------------
# determinism, workers, cache


def test_same_seed_same_pairs_and_epochs_differ(synth_root, cache):
    first = FramePairs(synth_root, size=24, seed=3, cache_dir=cache)
    second = FramePairs(synth_root, size=24, seed=3, cache_dir=cache)
    for index in (0, 5, 17):
        assert all(torch.equal(x, y) for x, y in zip(first[index], second[index]))
    draws = [first.pair_indices(i) for i in range(len(first))]
    first.set_epoch(1)
    assert sum(d != first.pair_indices(i) for i, d in enumerate(draws)) > 0.7 * len(draws)
    other_seed = FramePairs(synth_root, size=24, seed=4, cache_dir=cache)
    assert sum(d != other_seed.pair_indices(i) for i, d in enumerate(draws)) > 0.7 * len(draws)


def test_workers_give_the_same_pairs(synth_root, cache):
    pairs = FramePairs(synth_root, size=24, seed=1, cache_dir=cache)

    def batches(workers: int) -> list:
        loader = torch.utils.data.DataLoader(pairs, batch_size=6, num_workers=workers, shuffle=True,
                                             generator=torch.Generator().manual_seed(0))
        return [torch.cat(batch) for batch in loader]

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == 6
    assert all(torch.equal(x, y) for x, y in zip(serial, parallel))


def test_distributed_ranks_draw_different_pairs(synth_root, cache):
    from torch.utils.data.distributed import DistributedSampler

    pairs = FramePairs(synth_root, size=24, cache_dir=cache, length=40)  # even: no padding index
    ranks = [list(DistributedSampler(pairs, num_replicas=2, rank=r, shuffle=True, seed=0)) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
    assert [pairs.pair_indices(i) for i in ranks[0][:8]] != [pairs.pair_indices(i) for i in ranks[1][:8]]


def test_index_cache_spares_opening_the_videos(tmp_path, synth_root, monkeypatch):
    pytest.importorskip("av")
    cache = tmp_path / "cache"
    opened = []
    real_open = sources._open_video
    monkeypatch.setattr(sources, "_open_video", lambda path: opened.append(path) or real_open(path))
    first = FramePairs(synth_root / "Videos", size=16, cache_dir=cache)
    assert len(opened) == 3 and first.summary["index"] == {"hits": 0, "misses": 3}
    assert (cache / sources.INDEX_FILE).is_file()
    opened.clear()
    second = FramePairs(synth_root / "Videos", size=16, cache_dir=cache)
    assert opened == [] and second.summary["index"] == {"hits": 3, "misses": 0}
    assert [c.frames for c in second.clips] == [c.frames for c in first.clips] == [12, 12, 12]
    # a changed file is probed again
    copy = tmp_path / "videos"
    shutil.copytree(synth_root / "Videos", copy)
    FramePairs(copy, size=16, cache_dir=cache)
    opened.clear()
    (copy / "synth-0001.mp4").write_bytes((copy / "synth-0000.mp4").read_bytes())
    changed = FramePairs(copy, size=16, cache_dir=cache)
    assert len(opened) == 1 and changed.summary["index"] == {"hits": 2, "misses": 1}


def test_cache_env_and_disabled(tmp_path, synth_root, monkeypatch):
    monkeypatch.setenv("FMAPICON_CACHE", str(tmp_path / "env-cache"))
    FramePairs(synth_root, size=16)
    assert (tmp_path / "env-cache" / sources.INDEX_FILE).is_file()
    off = FramePairs(synth_root, size=16, cache_dir=False)
    assert off.summary["index"]["hits"] == 0


# ---------------------------------------------------------------------------------------
# synthetic scenes on the fly


def test_synth_source_renders_the_scenes_deterministically(cache):
    from fmapicon.data.synth import generate_scene

    pairs = FramePairs("synth:scenes=3,frames=6,size=48,objects=2", size=24, cache_dir=cache)
    assert pairs.summary["clips"] == 3 and len(pairs) == 15 and pairs.scale == pytest.approx(0.5)
    pair = pairs.load(4)
    scene = int(pair.clip.rsplit("#", 1)[1])
    frames = generate_scene(synth_scene_seed(1, scene), frames=6, size=(48, 48), objects=2).frames
    expected = Image.fromarray(frames[pair.index_a]).resize((24, 24), Image.BILINEAR, box=(0, 0, 48, 48))
    assert np.array_equal(np.rint(pair.a.permute(1, 2, 0).numpy() * 255).astype(np.uint8), np.asarray(expected))
    again = FramePairs("synth:scenes=3,frames=6,size=48,objects=2", size=24, cache_dir=cache)
    assert torch.equal(again[4][1], pair.b)


def test_synth_defaults_and_bad_options():
    options = parse_synth("synth", 120)
    assert options == {"scenes": 64, "frames": 40, "size": 160, "objects": 3, "seed": 1}
    with pytest.raises(UserError, match="bad synth option"):
        FramePairs("synth:scene=3")
    with pytest.raises(UserError, match="integer"):
        FramePairs("synth:scenes=many")


def test_mixed_sources(tmp_path, synth_root, cache):
    pairs = FramePairs([synth_root / "JPEGImages", "synth:scenes=2,frames=5,size=32"], size=16, cache_dir=cache)
    assert pairs.summary["by_kind"] == {"frames": 3, "synth": 2}
    assert len(pairs) == 3 * 11 + 2 * 4


def test_bench_data_writes_a_table_and_json(tmp_path, capsys):
    """``fmapicon bench data`` at a tiny size: a row per source and worker count, rates > 0."""
    import json

    from fmapicon.cli import main

    pytest.importorskip("av")
    out = tmp_path / "bench.json"
    argv = ["bench", "data", "--pairs", "8", "--batch", "4", "--size", "16", "--workers", "0", "--sequences", "2",
            "--frames", "6", "--scene-size", "32", "--davis", "", "--json", str(out)]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["source"] for row in rows] == ["video (mp4)", "frames (jpg)", "synth (on the fly)"]
    assert all(row["pairs"] >= 8 and row["pairs_per_s"] > 0 for row in rows)
    assert "pairs_per_s" in capsys.readouterr().out


# --------------------------------------------------------------------------- timing and display


def _write_timed_video(path: Path, frames: np.ndarray, pts, rotation=None, sar=None) -> Path:
    """frames with the given presentation timestamps (ms) in a Matroska file (VFR)."""
    av = pytest.importorskip("av")
    from fractions import Fraction

    with av.open(str(path), mode="w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=30, options={"crf": "12", "g": "5", "threads": "1",
                                                                   "bf": "0"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.time_base = Fraction(1, 1000)
        if sar is not None:
            stream.codec_context.sample_aspect_ratio = sar
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for frame, stamp in zip(frames, pts):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts, video_frame.time_base = stamp, Fraction(1, 1000)
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_variable_frame_rate_indices_are_exact(tmp_path, cache):
    frames = numbered_frames(16)
    pts = [round(1000 * t / 30) for t in range(8)] + [233 + 250 * (t - 7) for t in range(8, 16)]
    path = _write_timed_video(tmp_path / "vfr.mkv", frames, pts)
    for a, b in [(0, 1), (3, 4), (7, 8), (8, 9), (9, 12), (12, 15), (1, 15)]:
        image_a, image_b, b_read = read_video_pair(path, a, b)
        assert (frame_number(image_a), frame_number(image_b), b_read) == (a, b, b)
    pairs = FramePairs(path, size=16, cache_dir=cache)
    assert pairs.clips[0].frames == 16
    loaded = [pairs.load(index) for index in range(len(pairs))]
    assert all(frame_number(p.a) == p.index_a and frame_number(p.b) == p.index_b for p in loaded)
    assert pairs.summary["fallbacks"] == 0


def test_rotation_and_sample_aspect_ratio_are_applied(tmp_path, cache):
    from fractions import Fraction

    frames = np.zeros((4, 16, 32, 3), np.uint8)
    frames[:, :8, :8] = 255                             # a white block in the top-left corner
    path = _write_timed_video(tmp_path / "rot.mkv", frames, [0, 33, 67, 100], rotation=90)
    image, _, _ = read_video_pair(path, 0, 1)
    assert image.size == (16, 32)                       # W x H: a quarter turn
    grey = np.asarray(image.convert("L"), np.float32)
    # 90 degrees counter-clockwise: the top-left corner goes to the bottom-left
    assert grey[-8:, :8].mean() > 200 and grey[:8, :8].mean() < 50
    assert FramePairs(path, size=8, cache_dir=cache).clips[0].width == 16
    wide = _write_timed_video(tmp_path / "sar.mkv", frames, [0, 33, 67, 100], sar=Fraction(2, 1))
    image, _, _ = read_video_pair(wide, 0, 1)
    assert image.size == (64, 16)                       # square pixels: twice as wide


def test_the_data_package_reexports_its_public_names():
    """Scripts written against the flat layout keep working: fmapicon.data.FramePairs etc."""
    import fmapicon.data as data
    from fmapicon.data.pairs import FramePairs as pairs_class
    from fmapicon.data.sources import read_video_pair as reader

    assert data.FramePairs is pairs_class and data.read_video_pair is reader
    with pytest.raises(AttributeError):
        data.no_such_name  # noqa: B018


def test_dangling_links_and_companion_files_in_training_data(tmp_path, cache):
    frames = write_jpegs(tmp_path / "data" / "clip", numbered_frames(4))
    (frames / "._00000.jpg").write_bytes(b"\0\x05\x16\x07" + b"\0" * 100)  # macOS companion: not data
    (tmp_path / "data" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (frames / "00009.jpg").symlink_to(tmp_path / "gone.jpg")  # a link whose target was deleted
    (tmp_path / "data" / "old.mp4").symlink_to(tmp_path / "gone.mp4")
    with pytest.warns(SkippedFileWarning) as caught:
        pairs = FramePairs(tmp_path / "data", size=16, cache_dir=cache)
    assert pairs.summary["clips"] == 1 and pairs.clips[0].frames == 4
    assert pairs.summary["skipped"] == {"broken_link": 2}
    warned = [str(w.message) for w in caught if issubclass(w.category, SkippedFileWarning)]
    assert sorted(m.split(": ")[0].rsplit("/", 1)[-1] for m in warned) == ["00009.jpg", "old.mp4"]


def test_a_video_cut_without_reencoding_counts_the_frames_that_decode(tmp_path, cache):
    """A stream copy that starts mid-GOP (``ffmpeg -ss T -c copy``): its first packets need a
    keyframe that was cut off. They are no frames: frame 0 is the first that decodes."""
    av = pytest.importorskip("av")
    full = write_video(tmp_path / "full.mp4", numbered_frames(48), gop=12)
    cut = tmp_path / "clips" / "cut.mp4"
    cut.parent.mkdir()
    with av.open(str(full)) as source, av.open(str(cut), "w") as target:
        stream = target.add_stream_from_template(source.streams.video[0])
        packets = sorted((p for p in source.demux(video=0) if p.size), key=lambda p: p.dts)
        for packet in packets[17:]:  # packets before the keyframe of frame 24 first
            packet.stream = stream
            target.mux(packet)
    with av.open(str(cut)) as container:
        decoded = [frame_number(frame.to_image()) for frame in container.decode(video=0)]
    assert len(decoded) < len(packets) - 17  # the packets before the keyframe never decode
    pairs = FramePairs(cut.parent, size=16, cache_dir=cache)
    assert pairs.clips[0].frames == len(decoded)
    for a, b in ((0, 2), (3, 9), (len(decoded) - 3, len(decoded) - 1)):
        image_a, image_b, b_read = read_video_pair(cut, a, b)
        assert (frame_number(image_a), frame_number(image_b), b_read) == (decoded[a], decoded[b], b)
