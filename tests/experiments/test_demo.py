"""The main job: ``fmapicon demo --quick`` end to end, the results, the report, and refusing to mix runs."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmapicon.experiments import demo, shared
from fmapicon.data.davis import resolve_set
from fmapicon.errors import UserError

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> Path:
    """One ``fmapicon demo --quick`` run through the command line (shared by the tests below)."""
    from fmapicon.cli import main

    out = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    return out


def test_quick_demo_writes_results_for_all_four_models(quick_demo):
    results = json.loads((quick_demo / "results.json").read_text())
    assert list(results["models"]) == ["trained", "reference", "copy", "pixels", "random"]
    for name, figures in results["models"].items():
        assert 0.0 <= figures["jf_mean"] <= 1.0, name
        assert figures["epe_mean"] >= 0.0, name
        assert figures["davis_jf_mean"] is None and figures["pairs_epe_mean"] is None  # not asked for
    assert results["models"]["copy"]["ic_error_mean"] is None  # copy has no features
    # the training run is a complete run folder, and the only checkpoint folder under DIR
    run = quick_demo / "run"
    assert (run / "config.json").is_file() and (run / "checkpoints" / "last.safetensors").is_file()
    assert [p.parent for p in quick_demo.rglob("*.safetensors")] == [run / "checkpoints"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == results["training"]["steps"] == demo._trained_steps(run) >= 1
    assert results["training"]["input_scale"] == pytest.approx(demo.QUICK.scale)
    # the eval folders hold the scored predictions of every model
    for name in demo.MODELS:
        assert (quick_demo / "eval" / "synth" / name / "global_results-val.csv").is_file()


def test_copy_epe_is_the_zero_flow_of_the_held_out_pairs(quick_demo):
    results = json.loads((quick_demo / "results.json").read_text())
    pairs = shared.synthetic_pairs(demo.QUICK, seed=0)
    zero_flow = np.mean([np.linalg.norm(p.flow, axis=-1).mean() for p in pairs])
    assert results["models"]["copy"]["epe_mean"] == pytest.approx(zero_flow, rel=1e-6)


def test_report_embeds_every_picture(quick_demo):
    page = (quick_demo / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) >= 5  # curves, masks, features, flows, IC error maps
    for source in sources:
        if source.startswith("data:"):
            assert source.startswith("data:image/png;base64,")
            with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
                assert image.width > 50 and image.height > 50
        else:  # a relative reference must exist beside the page
            assert (quick_demo / source).is_file(), source
    for heading in ("Results", "Training", "Propagated masks", "Features", "Correspondence"):
        assert f"<h2>{heading}</h2>" in page
    assert "trained" in page and "pixels" in page and "random" in page and "copy" in page


def test_second_run_into_the_same_folder_refuses_and_mixes_nothing(quick_demo, capsys):
    from fmapicon.cli import main

    before = {p: p.read_bytes() for p in (quick_demo / "results.json", quick_demo / "report.html")}
    assert main(["demo", "--quick", "--out", str(quick_demo), "--no-progress"]) == 2
    assert "--force" in capsys.readouterr().err
    assert all(path.read_bytes() == data for path, data in before.items())
    with pytest.raises(UserError, match="--force"):
        demo.run_demo(demo.DemoConfig(out=str(quick_demo), quick=True, progress=False), say=lambda _: None)


def test_flyingchairs_pairs_are_read(flyingchairs_dir, tmp_path):
    pairs = demo.chairs_pairs(flyingchairs_dir)
    assert len(pairs) == 4
    assert pairs[0].a.shape == (384, 512, 3) and pairs[0].flow.shape == (384, 512, 2)
    with pytest.raises(UserError, match="no pairs"):
        demo.chairs_pairs(tmp_path)


def test_davis_set_resolution(tmp_path):
    (tmp_path / "ImageSets").mkdir()
    (tmp_path / "ImageSets" / "dev.txt").write_text("a\n")
    assert resolve_set(tmp_path, None) == "dev"
    assert resolve_set(tmp_path, "train") == "train"
    (tmp_path / "ImageSets" / "other.txt").write_text("b\n")
    with pytest.raises(UserError, match="--davis-set"):
        resolve_set(tmp_path, None, "--davis-set")
    (tmp_path / "ImageSets" / "val.txt").write_text("c\n")
    assert resolve_set(tmp_path, None) == "val"


@pytest.mark.slow
def test_report_renders_in_a_real_browser(quick_demo, tmp_path):
    """Headless Chromium (when installed) draws the page: a tall screenshot with the pictures in it."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium to render the report with")
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,3000",
                    (quick_demo / "report.html").resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[:2] == (3000, 1280)
    # not a blank page: many distinct colours from the embedded pictures
    assert len(np.unique(pixels.reshape(-1, 3)[::7], axis=0)) > 1000


@pytest.mark.slow
def test_quick_demo_with_davis_and_pairs(tmp_path, synth_root, flyingchairs_dir):
    """--davis (here: synthetic scenes in the DAVIS layout) and --pairs fill the DAVIS J&F and pair EPE."""
    config = demo.DemoConfig(out=str(tmp_path / "out"), quick=True, davis=str(synth_root), pairs=str(flyingchairs_dir),
                             device="cpu", progress=False)
    results = demo.run_demo(config, say=lambda _: None)
    for name in demo.MODELS:
        assert 0.0 <= results["models"][name]["davis_jf_mean"] <= 1.0
        assert results["models"][name]["pairs_epe_mean"] > 0.0
    chairs = demo.chairs_pairs(flyingchairs_dir)
    zero = np.mean([np.linalg.norm(p.flow, axis=-1).mean() for p in chairs])
    assert results["models"]["copy"]["pairs_epe_mean"] == pytest.approx(zero, rel=1e-6)
    page = (tmp_path / "out" / "report.html").read_text()
    assert "J&amp;F DAVIS" in page and "EPE pairs (px)" in page
    assert (tmp_path / "out" / "figures" / "masks_davis.png").is_file()
