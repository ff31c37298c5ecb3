"""Report pages: the HTML page embeds every picture and escapes text."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

from fmapicon.experiments import figures, report

pytest.importorskip("matplotlib")


def _embedded_pictures(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', page)


def _decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,"), uri[:40]
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_html_embeds_every_picture_and_escapes(tmp_path):
    curves = figures.save_png(tmp_path / "curves.png", np.full((12, 16, 3), 200, np.uint8))
    heat = figures.plot_heatmap(np.random.default_rng(0).random((20, 30)) * 4, tmp_path / "ic.png",
                               "inverse-consistency error")
    grid = figures.picture_grid([[np.zeros((8, 8, 3), np.uint8)] * 2] * 2, tmp_path / "grid.png",
                               row_labels=["r0", "r1"], column_labels=["c0", "c1"])
    table = report.html_table(
        [{"model": "trained", "jf_mean": 0.7, "epe_mean": 2.0}, {"model": "copy<x>", "jf_mean": 0.5, "epe_mean": None}],
        best={"jf_mean": "max", "epe_mean": "min"})
    assert "<b>0.700</b>" in table and "<b>2.000</b>" in table and "copy&lt;x&gt;" in table and "&ndash;" in table
    page_path = report.write_html(tmp_path / "report.html", "A <title>", [
        report.Section("Curves", text="x < y", images=[(curves, "curves"), (heat, "error")]),
        report.Section("Table", html=table, images=[(grid, "grid")]),
    ])
    page = page_path.read_text()
    pictures = _embedded_pictures(page)
    assert len(pictures) == 3
    sizes = [_decode(uri).size for uri in pictures]
    assert all(w > 0 and h > 0 for w, h in sizes)
    assert "A &lt;title&gt;" in page and "x &lt; y" in page
    with pytest.raises(FileNotFoundError):
        report.write_html(tmp_path / "bad.html", "t", [report.Section("s", images=[(tmp_path / "no.png", "")])])
    assert not (tmp_path / "bad.html").exists()
