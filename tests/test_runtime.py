"""Output folders built aside and published whole (``staged_output``), and the listing rule."""

import os
import signal

import pytest

from fmapicon.errors import UserError
from fmapicon.paths import display_path, visible_files
from fmapicon.runtime import check_output_folder, staged_output, unstaged


def _tree(folder):
    """{relative path: bytes} of every file under ``folder``: the folder byte for byte."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _earlier(out):
    (out / "seq").mkdir(parents=True)
    (out / "seq" / "00000.png").write_bytes(b"old mask")
    (out / "eval.json").write_text('{"jf_mean": 0.5}')
    (out / "notes.txt").write_text("mine")
    return _tree(out)


@pytest.mark.parametrize("stop", [UserError("a broken frame"), KeyboardInterrupt(), RuntimeError("crash")])
def test_a_rerun_stopped_midway_leaves_the_earlier_folder_byte_for_byte(tmp_path, stop):
    out = tmp_path / "ev"
    before = _earlier(out)
    with pytest.raises(type(stop)):
        with staged_output(out, force=True, outputs=["seq", "eval.json"]) as staging:
            (staging / "seq").mkdir()
            (staging / "seq" / "00000.png").write_bytes(b"new mask")
            raise stop
    assert _tree(out) == before
    assert sorted(os.listdir(tmp_path)) == ["ev"]  # no staging folder left behind


def test_a_complete_rerun_replaces_the_earlier_outputs_and_keeps_other_files(tmp_path):
    out = tmp_path / "ev"
    _earlier(out)
    (out / "other_seq").mkdir()
    with staged_output(out, force=True, outputs=["seq", "other_seq", "eval.json"], last=("eval.json",)) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".ev.partial-")
        (staging / "seq2").mkdir()
        (staging / "seq2" / "00000.png").write_bytes(b"new")
        (staging / "eval.json").write_text("{}")
        assert (out / "seq" / "00000.png").read_bytes() == b"old mask"  # nothing removed before the end
    assert _tree(out) == {"eval.json": b"{}", "notes.txt": b"mine", "seq2/00000.png": b"new"}
    assert sorted(os.listdir(tmp_path)) == ["ev"]


def test_a_new_folder_appears_whole(tmp_path):
    with staged_output(tmp_path / "a" / "new") as staging:
        (staging / "x.txt").write_text("x")
        assert not (tmp_path / "a" / "new").exists()
    assert _tree(tmp_path / "a" / "new") == {"x.txt": b"x"}


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_a_new_folder_gets_the_mode_the_umask_gives(tmp_path, mask):
    before = os.umask(mask)
    try:
        with staged_output(tmp_path / "new"):
            pass
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(before)
    assert (tmp_path / "new").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777 == 0o777 & ~mask


def test_ctrl_c_during_the_moves_waits_for_them(tmp_path, monkeypatch):
    out = tmp_path / "ev"
    _earlier(out)
    real = os.replace

    def replace_after_ctrl_c(src, dst):  # Ctrl-C arrives as the first entry is moved
        monkeypatch.setattr(os, "replace", real)
        signal.raise_signal(signal.SIGINT)
        return real(src, dst)

    with pytest.raises(KeyboardInterrupt):
        with staged_output(out, force=True, outputs=["seq"]) as staging:
            (staging / "a.txt").write_text("a")
            (staging / "b.txt").write_text("b")
            monkeypatch.setattr(os, "replace", replace_after_ctrl_c)
    assert (out / "a.txt").read_text() == "a" and (out / "b.txt").read_text() == "b"
    assert not (out / "seq").exists()


def test_a_move_that_fails_while_publishing_puts_the_earlier_outputs_back(tmp_path, monkeypatch):
    out = tmp_path / "ev"
    before = _earlier(out)
    real = os.replace

    def replace_failing_on_b(src, dst):          # the second staged entry cannot be moved in
        if os.path.basename(src) == "b.txt":
            raise OSError(28, "No space left on device")
        return real(src, dst)

    with pytest.raises(OSError, match="No space"):
        with staged_output(out, force=True, outputs=["seq", "eval.json"]) as staging:
            (staging / "a.txt").write_text("a")
            (staging / "b.txt").write_text("b")
            monkeypatch.setattr(os, "replace", replace_failing_on_b)
    assert _tree(out) == before
    assert sorted(os.listdir(tmp_path)) == ["ev"]  # no staging or trash folder left behind


def test_a_non_empty_folder_is_refused_without_force_and_nothing_is_deleted(tmp_path):
    out = tmp_path / "ev"
    before = _earlier(out)
    with pytest.raises(UserError, match="--force"):
        with staged_output(out, force=False, outputs=["seq"]):
            pytest.fail("the work must not start")
    assert _tree(out) == before
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a folder"):
        check_output_folder(tmp_path / "file", force=True)
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".DS_Store").write_bytes(b"\0")
    check_output_folder(hidden, force=False)  # companion files are not outputs


def test_recorded_paths_name_the_published_folder(tmp_path):
    staging, out = tmp_path / ".ev.partial-x", tmp_path / "ev"
    record = {"run": str(staging / "run"), "runs": [staging / "a"], "other": str(tmp_path / "elsewhere"), "n": 3}
    assert unstaged(record, staging, out) == {"run": str(out / "run"), "runs": [out / "a"],
                                              "other": str(tmp_path / "elsewhere"), "n": 3}


def test_listing_skips_hidden_and_companion_files(tmp_path):
    for name in ("00000.jpg", "00001.JPG", "._00000.jpg", ".DS_Store", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    assert [p.name for p in visible_files(tmp_path, (".jpg", ".png"))] == ["00000.jpg", "00001.JPG"]
    assert visible_files(tmp_path / "missing") == []


def test_display_path_renders_any_name():
    latin = os.fsdecode(b"s\xe9q")
    assert display_path(f"/data/{latin}/00000.png") == "/data/s\\xe9q/00000.png"
    assert display_path("séq b 1") == "séq b 1"
    display_path(latin).encode("utf-8")  # printable in strict UTF-8
