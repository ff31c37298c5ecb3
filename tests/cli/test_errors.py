"""The error rule of the command line: what a user can fix is one line and exit 2; a
programming error keeps its traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fmapicon.cli import main
from fmapicon.errors import UserError


def _score_raising(monkeypatch, error):
    import fmapicon.evaluation.metrics as metrics

    def score_davis(*args, **kwargs):
        raise error

    monkeypatch.setattr(metrics, "score_davis", score_davis)


def test_a_user_error_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    _score_raising(monkeypatch, UserError(f"results folder {tmp_path} does not exist"))
    assert main(["score", "--davis", str(tmp_path), "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and err.startswith("fmapicon score: error: results folder")


def test_a_programming_error_keeps_its_traceback(monkeypatch, tmp_path):
    """A ValueError or TypeError from the library is a bug (or API misuse), not a usage error:
    main lets it through, so the user and the report see where it came from."""
    for error in (ValueError("a1 must be finite"), TypeError("unexpected keyword")):
        _score_raising(monkeypatch, error)
        with pytest.raises(type(error), match=str(error)):
            main(["score", "--davis", str(tmp_path), "--results", str(tmp_path)])


def test_a_programming_error_prints_a_traceback_from_the_command(tmp_path):
    code = ("import sys, fmapicon.evaluation.metrics as m\n"
            "def boom(*a, **k): raise ValueError('probe: a bug')\n"
            "m.score_davis = boom\n"
            "from fmapicon.cli import main\n"
            f"sys.exit(main(['score', '--davis', {str(tmp_path)!r}, '--results', {str(tmp_path)!r}]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "ValueError: probe: a bug" in done.stderr
