"""``fmapicon ablate``: attempts, the eval-mode log_p diagnostic, the tables, and (slow) the quick run."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from fmapicon.experiments import ablate
from fmapicon.errors import UserError
from fmapicon.core.networks import FeatureNet, NormScale


class PositionalCode(nn.Module):
    """Ignores the image: pixel (y, x) gets one-hot channel y * W + x (a perfect positional code)."""

    stride = 1

    def __init__(self, size: int):
        super().__init__()
        self.channels = size * size
        self.code = nn.Parameter(torch.eye(size * size).view(size * size, size, size))

    def forward(self, images):
        return self.code.expand(images.shape[0], -1, -1, -1)


def test_attempts_match_the_writeup():
    assert [(a.name, a.aug, a.center) for a in ablate.ATTEMPTS.values()] == [
        ("0", "none", False), ("1", "affine", False), ("2", "affine", True), ("3", "roll+affine", True)]
    config = ablate.AblationConfig(seed=5)
    setup = config.setup()
    for attempt in ablate.ATTEMPTS.values():
        train = ablate.train_config(config, setup, attempt)
        assert (train.aug, train.center) == (attempt.aug, attempt.center)
        # everything else is shared by every attempt
        assert (train.data, train.size, train.batch, train.seed, train.minutes) == (
            ablate.train_config(config, setup, ablate.ATTEMPTS["3"]).data, setup.size, setup.batch, 5, setup.minutes)
    assert ablate.QUICK.size <= 48


def test_extra_configurations_are_parsed_and_checked():
    extra = ablate.parse_extra("roll-only:aug=roll,center=false,lr=0.0005")
    assert (extra.name, extra.aug, extra.center) == ("roll-only", "roll", False)
    assert extra.options == {"aug": "roll", "center": False, "lr": 0.0005}
    train = ablate.train_config(ablate.AblationConfig(), ablate.QUICK, extra)
    assert (train.aug, train.center, train.lr) == ("roll", False, 0.0005)
    for bad in ("no-colon", "x:aug=twirl", "x:nonsense=1", "3:aug=roll", "x:aug", "x:data=a", "x:center=maybe"):
        with pytest.raises(UserError):
            ablate.parse_extra(bad)
    chosen = ablate.select_attempts(["3", "0", "3"], ["mine:aug=roll"])
    assert [a.name for a in chosen] == ["3", "0", "mine"]
    with pytest.raises(UserError, match="unknown attempt"):
        ablate.select_attempts(["4"], [])
    # --attempts none: only the extra configurations (and an error when there are none)
    from fmapicon.cli.ablate import _attempt_list

    assert _attempt_list("none") == [] and _attempt_list("3, 0") == ["3", "0"]
    assert [a.name for a in ablate.select_attempts(_attempt_list("none"), ["lam4:lambda_init=4"])] == ["lam4"]
    assert ablate.parse_extra("fixed:max_gap=4,learn_lambda=false").options == {"max_gap": 4, "learn_lambda": False}
    with pytest.raises(UserError, match="no attempts to run"):
        ablate.select_attempts([], [])


def test_eval_log_p_sees_a_positional_code_under_its_own_augmentation():
    """A positional code scores log_p ~ 0 = log_p_shuffled without augmentation (attempt 0's collapse),
    and is punished by rolling, which moves every pixel to another location."""
    size = 8
    net = FeatureNet(PositionalCode(size), None, NormScale(12.0), stride=1, channels=size * size)
    generator = torch.Generator().manual_seed(0)
    pairs = (torch.rand(4, 3, size, size, generator=generator), torch.rand(4, 3, size, size, generator=generator))
    true, shuffled = ablate.pair_log_p(net, "none", pairs, seed=0)
    assert true > -1e-3 and abs(true - shuffled) < 1e-6
    rolled, _ = ablate.pair_log_p(net, "roll", pairs, seed=0)
    assert rolled < -5.0
    assert net.training  # restored


def test_tables_have_the_exact_columns():
    rows = [{"attempt": "0", "aug": "none", "center": False, "log_p": -0.01, "log_p_shuffled": -0.02,
             "jf_mean": 0.4, "epe_mean": 1.5},
            {"attempt": "3", "aug": "roll+affine", "center": True, "log_p": -3.0, "log_p_shuffled": -5.0,
             "jf_mean": 0.8, "epe_mean": 0.9}]
    text = ablate.csv_text(rows, ablate.CSV_COLUMNS)
    parsed = list(csv.reader(text.splitlines()))
    assert parsed[0] == ["attempt", "aug", "center", "log_p", "log_p_shuffled", "jf_mean", "epe_mean"]
    assert parsed[1] == ["0", "none", "false", "-0.0100", "-0.0200", "0.4000", "1.5000"]
    assert parsed[2][2] == "true"
    markdown = ablate.markdown_table(rows, ablate.CSV_COLUMNS).splitlines()
    assert markdown[0] == "| attempt | aug | center | log_p | log_p_shuffled | jf_mean | epe_mean |"
    assert len(markdown) == 4
    assert ablate.collapse_verdict(rows).startswith("attempt 0 shows the collapse")
    assert ablate.best_verdict(rows) == "Best J&F: attempt 3 (0.800); best EPE: attempt 3 (0.900 px)."
    rows[0]["log_p_shuffled"] = -1.0
    assert ablate.collapse_verdict(rows).startswith("attempt 0 does not show")


@pytest.mark.slow
def test_quick_ablation_shows_the_collapse_of_attempt_0(tmp_path):
    """``fmapicon ablate --quick`` (24 x 24, 150 steps per attempt): attempt 0 has the highest held-out
    log_p and cannot tell true pairs from shuffled ones."""
    from fmapicon.cli import main

    out = tmp_path / "ablate"
    assert main(["ablate", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    with open(out / "ablation.csv") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ablate.CSV_COLUMNS
        rows = list(reader)
    assert [r["attempt"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["center"] for r in rows] == ["false", "false", "true", "true"]
    log_p = {r["attempt"]: float(r["log_p"]) for r in rows}
    zero = rows[0]
    assert log_p["0"] == max(log_p.values())
    assert abs(float(zero["log_p"]) - float(zero["log_p_shuffled"])) < 0.2
    for name in ("ablation.md", "ablation_curves.png", "ablation_features.png", "report.html"):
        assert (out / name).is_file()
    assert json.loads((out / "ablation.json").read_text())["verdict"].startswith("attempt 0 shows")
    assert main(["ablate", "--quick", "--out", str(out), "--no-progress"]) == 2  # never mixes runs
