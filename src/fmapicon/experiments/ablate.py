"""The writeup's story in one command: ``fmapicon ablate`` trains and compares attempts 0-3.

The writeup tries four ways to make the FeatureMapICON objective learn something:

===========  ===============  ============  =====================================================
attempt      aug              center        what the writeup found
===========  ===============  ============  =====================================================
0            none             false         a positional code: log_p -> 0 while learning nothing
1            affine           false         learns, then drifts to region-specific features
2            affine           true          PixelCenter: the same mean at every location
3            roll+affine      true          rolling: the same distribution at every location
===========  ===============  ============  =====================================================

Every attempt is trained with the same data, network, seed and budget (``--steps`` per
attempt, capped by ``--minutes``; the demo's setup: 32 x 32 synthetic scenes, lambda 4,
300 steps), its PixelCenter running mean (attempts 2 and 3) recomputed at the final weights
(as training writes every weights file), then evaluated the same way:

- ``log_p`` and ``log_p_shuffled``: the exact objective (eps = 0) on held-out pairs, the
  network in eval mode, under the attempt's *own* augmentation; shuffled pairs take B from
  another held-out video. A positional code scores the same on both (|difference| ~ 0).
- ``jf_mean``: label propagation J&F on held-out synthetic sequences (CRW protocol);
  ``epe_mean``: end-point error of Phi^AB against the exact synthetic flow.

Outputs in DIR: ``ablation.csv`` (``attempt,aug,center,log_p,log_p_shuffled,jf_mean,
epe_mean``; a ``davis_jf_mean`` column is appended with ``--davis``), ``ablation.md`` (the
same table), ``ablation.json``, ``ablation_curves.png`` (log_p and log_p_shuffled of every
attempt during training), ``ablation_features.png`` (PCA-colour features of every attempt
on the same frames), ``report.html`` (all of it on one page), one run folder per attempt
(``attempt0`` ...), the held-out scenes and the evaluations.

``--extra NAME:key=value,...`` adds a configuration of your own (keys of ``fmapicon
train``, e.g. ``--extra roll-only:aug=roll,center=false``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from fmapicon.errors import UserError
from fmapicon.experiments import shared
from fmapicon.experiments.shared import DemoSetup, with_budget

CSV_COLUMNS = ["attempt", "aug", "center", "log_p", "log_p_shuffled", "jf_mean", "epe_mean"]

#: what the ablation writes under DIR (and --force replaces); attempt run folders are added per run
OUTPUTS = ("heldout", "eval", "ablation.csv", "ablation.md", "ablation.json", "ablation_curves.png",
           "ablation_features.png", "report.html")


@dataclass(frozen=True)
class Attempt:
    """One configuration of the story: a name, and the training options it changes."""

    name: str
    aug: str
    center: bool
    note: str = ""
    options: dict = field(default_factory=dict, hash=False, compare=False)


ATTEMPTS = {
    "0": Attempt("0", "none", False, "no augmentation: free to learn a positional code"),
    "1": Attempt("1", "affine", False, "small affine warps"),
    "2": Attempt("2", "affine", True, "affine warps + PixelCenter"),
    "3": Attempt("3", "roll+affine", True, "rolling + affine + PixelCenter (attempt 3: the writeup's final version)"),
}


@dataclass(frozen=True)
class AblationSetup(DemoSetup):
    """The demo's setup (``fmapicon.experiments.shared.DemoSetup``: data, network, budget, held-out evaluation),
    shared by every attempt (defaults: under an hour on 2 CPU cores), plus

    logp_pairs : held-out pairs for the eval-mode log_p
    """

    logp_pairs: int = 32


#: a few minutes for tests: 24 x 24 scenes, 150 steps per attempt (attempt
#: 0 needs about that many to forget the images; the minutes are only a safety cap on a slow machine)
QUICK = AblationSetup(size=24, render=24, batch=8, channels=32, scenes=8, frames=12, minutes=20.0, steps=150,
                       eval_sequences=2, eval_frames=8, epe_pairs=2, epe_gap=4, logp_pairs=16, workers=0, log_every=5)


@dataclass
class AblationConfig:
    """The options of ``fmapicon ablate``."""

    out: str = "runs/ablate"
    attempts: list = field(default_factory=lambda: list(ATTEMPTS))
    extra: list = field(default_factory=list)
    data: list = field(default_factory=list)
    minutes: float | None = None
    steps: int | None = None
    davis: str | None = None
    davis_set: str | None = None
    quick: bool = False
    force: bool = False
    device: str = "auto"
    seed: int = 0
    progress: bool = True

    def setup(self) -> AblationSetup:
        return with_budget(QUICK if self.quick else AblationSetup(), self.minutes, self.steps)


# --------------------------------------------------------------------------- attempts


def parse_extra(text: str) -> Attempt:
    """``NAME:key=value,key=value`` (keys of TrainConfig) -> an Attempt; aug and center default
    to attempt 3's (roll+affine, true)."""
    from fmapicon.train import TrainConfig

    name, sep, tail = text.partition(":")
    if not sep or not name or any(c in name for c in ",/ ") or name in ATTEMPTS:
        raise UserError(f"--extra {text!r}: expected NAME:key=value,... with a new name (not 0-3, no commas, "
                        "slashes or spaces), e.g. roll-only:aug=roll,center=false")
    options = {}
    for item in filter(None, (part.strip() for part in tail.split(","))):
        key, has_value, value = item.partition("=")
        if not has_value:
            raise UserError(f"--extra {text!r}: {item!r} is not key=value")
        options[key.strip().replace("-", "_")] = value.strip()
    options = {key: _typed(key, value, text) for key, value in options.items()}
    checked = TrainConfig.from_mapping(options)  # raises UserError naming bad keys or values
    kept = {key: getattr(checked, key) for key in options}
    return Attempt(name, checked.aug, checked.center, f"custom: {tail}", kept)


def _typed(key: str, value: str, text: str):
    """A command-line string as the type of TrainConfig's field ``key`` (unknown keys pass through,
    for TrainConfig to name)."""
    from fmapicon.train import config_fields

    kind = config_fields().get(key, {}).get("kind")
    if kind == "list":
        raise UserError(f"--extra {text!r}: every attempt trains on the same data; give it with --data")
    try:
        if kind == "bool":
            return {"true": True, "yes": True, "on": True, "1": True,
                    "false": False, "no": False, "off": False, "0": False}[value.lower()]
        if kind in ("int", "float"):
            return int(value) if kind == "int" else float(value)
    except (KeyError, ValueError):
        raise UserError(f"--extra {text!r}: {key}={value!r} is not a valid {kind}") from None
    return value


def select_attempts(names: list, extras: list) -> list[Attempt]:
    unknown = [n for n in names if n not in ATTEMPTS]
    if unknown:
        raise UserError(f"unknown attempt(s) {', '.join(unknown)}: choose from {', '.join(ATTEMPTS)} "
                        "(add your own with --extra NAME:key=value,...)")
    chosen = [ATTEMPTS[n] for n in dict.fromkeys(names)] + [parse_extra(e) for e in extras]
    if not chosen:
        raise UserError("no attempts to run: give --attempts and/or --extra")
    if len({a.name for a in chosen}) != len(chosen):
        raise UserError("two attempts share a name: give each --extra its own NAME")
    return chosen


def train_config(config: AblationConfig, setup: AblationSetup, attempt: Attempt):
    """The attempt's TrainConfig: the demo's run (``fmapicon.experiments.shared.train_config``: the shared data,
    network, seed and budget) with the attempt's aug / center and options."""
    from fmapicon.train import TrainConfig

    return TrainConfig.from_mapping({"aug": attempt.aug, "center": attempt.center, **attempt.options},
                                    shared.train_config(config, setup))


# --------------------------------------------------------------------------- evaluation


def heldout_batch(root: Path, setup: AblationSetup, seed: int):
    """``(A, B)``: ``setup.logp_pairs`` held-out pairs, ``n x 3 x S x S``, the same for every attempt."""
    import torch

    from fmapicon.data.pairs import FramePairs

    pairs = FramePairs(str(root), size=setup.size, max_gap=setup.max_gap, seed=seed, cache_dir=False)
    count = min(setup.logp_pairs, len(pairs))
    # spread over the whole set, so that consecutive pairs come from different videos
    indices = [round(i * (len(pairs) - 1) / max(count - 1, 1)) for i in range(count)]
    a, b = zip(*(pairs[i] for i in indices))
    return torch.stack(a), torch.stack(b)


def heldout_log_p(run: Path, aug: str, pairs, seed: int, device) -> tuple[float, float]:
    """(log_p, log_p_shuffled) of a trained run on held-out pairs: eval mode, its own augmentation."""
    from fmapicon.core.checkpoint import feature_net, load

    net = feature_net(load(run, device=device))  # lambda-scaled features, as in training
    return pair_log_p(net, aug, pairs, seed)


def pair_log_p(net, aug: str, pairs, seed: int) -> tuple[float, float]:
    """(log_p, log_p_shuffled) of a feature network in eval mode on pairs ``(A, B)``, ``n x 3 x S x S``.

    log_p = mean over pairs of the exact objective (eps = 0) of four feature maps, each under
    its own draw of augmentation ``aug`` (seeded by ``seed``); log_p_shuffled pairs each A
    with the next pair's B (another video), as training's diagnostic does.
    """
    import torch

    from fmapicon.core.augment import four_draws, make_augmentation
    from fmapicon.core.objective import log_p, log_p_shuffled

    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    a, b = (t.to(device) for t in pairs)
    generator = torch.Generator().manual_seed(seed)
    try:
        with torch.no_grad():
            maps = four_draws(net, a, b, make_augmentation(aug, stride=net.stride), generator=generator)
            true = log_p(*maps).mean()
            shuffled = log_p_shuffled(*maps).mean()
    finally:
        net.train(was_training)
    return float(true), float(shuffled)


def evaluate_attempt(run: Path, attempt: Attempt, setup: AblationSetup, heldout: Path, pairs, flow_pairs,
                     out: Path, device, progress: bool, davis=None) -> dict:
    """The row of one attempt: held-out log_p, J&F on held-out scenes, EPE (and DAVIS J&F)."""
    import numpy as np

    from fmapicon.experiments.shared import match_pair, propagation_params
    from fmapicon.evaluation.features import load_model
    from fmapicon.data.flow import epe_stats
    from fmapicon.evaluation.davis_eval import evaluate_davis

    true, shuffled = heldout_log_p(run, attempt.aug, pairs, seed=1, device=device)
    synth = evaluate_davis(str(run), heldout, out / "synth", set_name="val",
                           params=propagation_params(setup.eval_stride), device=device, progress=progress)
    model = load_model(str(run), device)
    epe = [epe_stats(match_pair(model, pair, setup.eval_stride).flow_ab[0].permute(1, 2, 0).cpu().numpy(),
                     pair.flow)["epe_mean"] for pair in flow_pairs]
    row = {"attempt": attempt.name, "aug": attempt.aug, "center": attempt.center, "log_p": true,
           "log_p_shuffled": shuffled, "jf_mean": float(synth["jf_mean"]), "epe_mean": float(np.mean(epe))}
    if davis is not None:
        root, set_name = davis
        scored = evaluate_davis(str(run), root, out / "davis", set_name=set_name, params=propagation_params(),
                                device=device, progress=progress)
        row["davis_jf_mean"] = float(scored["jf_mean"])
    return row


def copy_row(heldout: Path, setup: AblationSetup, flow_pairs, out: Path, davis=None) -> dict:
    """The copy baseline in the same terms (first mask repeated; zero flow), for the markdown table."""
    import numpy as np

    from fmapicon.experiments.shared import propagation_params
    from fmapicon.evaluation.davis_eval import evaluate_davis

    synth = evaluate_davis("copy", heldout, out / "synth", set_name="val",
                           params=propagation_params(setup.eval_stride), progress=False)
    row = {"attempt": "copy", "aug": "-", "center": "-", "log_p": None, "log_p_shuffled": None,
           "jf_mean": float(synth["jf_mean"]),
           "epe_mean": float(np.mean([np.linalg.norm(p.flow, axis=-1).mean() for p in flow_pairs]))}
    if davis is not None:
        row["davis_jf_mean"] = float(evaluate_davis("copy", davis[0], out / "davis", set_name=davis[1],
                                                    progress=False)["jf_mean"])
    return row


# --------------------------------------------------------------------------- tables


def csv_text(rows: list[dict], columns: list[str]) -> str:
    """The ablation CSV: booleans as true/false, numbers with 4 decimals, missing values empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row.get(c)) for c in columns])
    return buffer.getvalue()


def _csv_cell(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.4f}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_csv_cell(row.get(c)) or "-" for c in columns) + " |")
    return "\n".join(lines)


def collapse_verdict(rows: list[dict]) -> str:
    """A sentence on attempt 0: does it show the writeup's collapse (highest log_p, log_p ~ shuffled)?"""
    zero = next((r for r in rows if r["attempt"] == "0"), None)
    if zero is None:
        return "attempt 0 was not run."
    others = [r["log_p"] for r in rows if r["attempt"] != "0" and r.get("log_p") is not None]
    gap = abs(zero["log_p"] - zero["log_p_shuffled"])
    highest = all(zero["log_p"] > other for other in others)
    shown = highest and gap < 0.2
    return (f"attempt 0 {'shows' if shown else 'does not show'} the collapse: log_p {zero['log_p']:.3f} "
            f"({'the highest' if highest else 'not the highest'} of the attempts), |log_p - log_p_shuffled| = "
            f"{gap:.3f} ({'<' if gap < 0.2 else '>='} 0.2: {'a positional code' if gap < 0.2 else 'depends on the image pair'}).")


def best_verdict(rows: list[dict]) -> str:
    """A sentence on which attempt has the best J&F (highest) and the best EPE (lowest)."""
    def best(key, pick):
        scored = [r for r in rows if isinstance(r.get(key), float) and math.isfinite(r[key])]
        return pick(scored, key=lambda r: r[key]) if scored else None

    jf, epe = best("jf_mean", max), best("epe_mean", min)
    if jf is None or epe is None:
        return ""
    return (f"Best J&F: attempt {jf['attempt']} ({jf['jf_mean']:.3f}); best EPE: attempt {epe['attempt']} "
            f"({epe['epe_mean']:.3f} px).")


# --------------------------------------------------------------------------- pictures


def feature_picture(runs: dict, heldout: Path, stride: int, path: Path, device, davis=None) -> Path:
    """Rows: the frames, then each attempt's PCA-colour features on them."""
    from fmapicon.data.davis import frame_paths, layout, sequence_names
    from fmapicon.data.images import read_image
    from fmapicon.evaluation.features import load_model
    from fmapicon.experiments import figures

    images, _ = layout(heldout)
    frames = [(read_image(frame_paths(images, name)[0]), stride) for name in sequence_names(heldout, "val")[:3]]
    if davis is not None:
        davis_images, _ = layout(davis[0])
        frames.append((read_image(frame_paths(davis_images, sequence_names(davis[0], davis[1])[0])[0]), 8))
    rows, labels = [[frame for frame, _ in frames]], ["frame"]
    for name, run in runs.items():
        rows.append(figures.feature_pictures(load_model(str(run), device), frames))
        labels.append(f"attempt {name}")
    return figures.picture_grid(rows, path, row_labels=labels, cell_inches=2.2)


# --------------------------------------------------------------------------- the whole job


def run_ablation(config: AblationConfig, say=print) -> list[dict]:
    """Train and evaluate every chosen attempt; write the tables and pictures; return the rows."""
    from fmapicon.data.davis import resolve_set
    from fmapicon.runtime import resolve_device, staged_output

    attempts = select_attempts(config.attempts, config.extra)
    setup = config.setup()
    device = resolve_device(config.device)
    davis = (Path(config.davis), resolve_set(config.davis, config.davis_set, "--davis-set")) if config.davis else None
    out = Path(config.out)
    outputs = (*OUTPUTS, *(f"attempt{a.name}" for a in attempts))
    with staged_output(out, force=config.force, outputs=outputs, what="the earlier ablation",
                       last=("ablation.json",)) as work:
        return _run_attempts(config, attempts, setup, work, device, davis, say)


def _run_attempts(config: AblationConfig, attempts, setup, work: Path, device, davis, say) -> list[dict]:
    """Train, evaluate and tabulate ``attempts`` into ``work`` (the staging folder of DIR)."""
    from fmapicon.experiments.shared import synthetic_pairs, write_heldout
    from fmapicon.train import train

    started = time.monotonic()
    heldout = work / "heldout"
    write_heldout(heldout, setup, config.seed)
    pairs = heldout_batch(heldout, setup, seed=config.seed)
    flow_pairs = synthetic_pairs(setup, config.seed)
    rows, runs = [], {}
    for attempt in attempts:
        say(f"attempt {attempt.name}: aug {attempt.aug}, center {str(attempt.center).lower()} ({attempt.note})")
        attempt_config = train_config(config, setup, attempt)
        runs[attempt.name] = train(attempt_config, work / f"attempt{attempt.name}", progress=config.progress)
        rows.append(evaluate_attempt(runs[attempt.name], attempt, setup, heldout, pairs, flow_pairs,
                                     work / "eval" / f"attempt{attempt.name}", device, config.progress, davis))
        say("  " + ", ".join(f"{k} {_csv_cell(v)}" for k, v in rows[-1].items() if k not in ("attempt",)))
    baseline = copy_row(heldout, setup, flow_pairs, work / "eval" / "copy", davis)
    write_outputs(work, rows, baseline, runs, setup, config, heldout, device, davis,
                  seconds=time.monotonic() - started)
    return rows


def write_outputs(out: Path, rows, baseline, runs, setup, config, heldout, device, davis, seconds) -> None:
    from fmapicon.runtime import machine_info
    from fmapicon.experiments import figures, report
    from fmapicon.runtime import atomic_write, write_json

    columns = CSV_COLUMNS + (["davis_jf_mean"] if davis else [])
    with atomic_write(out / "ablation.csv", "w") as handle:
        handle.write(csv_text(rows, columns))
    verdict = " ".join(filter(None, [collapse_verdict(rows), best_verdict(rows)]))
    markdown = (f"# Ablation: the writeup's attempts\n\n{markdown_table(rows + [baseline], columns)}\n\n"
                f"{_measured(setup)}\n\n{verdict}\n")
    with atomic_write(out / "ablation.md", "w") as handle:
        handle.write(markdown)
    machine = machine_info()
    write_json(out / "ablation.json", {"rows": rows, "copy": baseline, "verdict": verdict, "seconds": seconds,
                                       "machine": machine, "recipe": dataclasses.asdict(setup),
                                       "config": dataclasses.asdict(config)})
    curves = figures.plot_log_p_comparison({f"attempt {name}": run for name, run in runs.items()},
                                          out / "ablation_curves.png")
    features = feature_picture(runs, heldout, setup.eval_stride, out / "ablation_features.png", device, davis)
    table = report.html_table(rows + [baseline], columns, best={"jf_mean": "max", "epe_mean": "min"},
                              caption=_measured(setup))
    report.write_html(out / "report.html", "FeatureMapICON ablation: attempts 0-3", [
        report.Section("Results", text=f"{_ATTEMPTS_TEXT}\n\n{verdict}", html=table),
        report.Section("log_p during training", text=_CURVES_TEXT,
                       images=[(curves, "solid: true pairs; dashed: shuffled pairs")]),
        report.Section("Features", text=_FEATURES_TEXT, images=[(features, "one row per attempt")]),
    ], meta=report.machine_line(machine, seconds))


_ATTEMPTS_TEXT = ("The writeup's attempts, trained with the same data, network, seed and step budget: 0, no "
                  "augmentation; 1, small affine warps; 2, affine + PixelCenter; 3, roll + affine + PixelCenter "
                  "(attempt 3: the writeup's final version).")
_CURVES_TEXT = ("log_p on each step's true pairs (solid) and on shuffled pairs whose frame B comes from another "
                "video (dashed). A positional code scores both alike; features that follow the images score "
                "true pairs higher.")
_FEATURES_TEXT = ("Each attempt's features on the same held-out frames, projected on the attempt's top three "
                  "principal components as red, green and blue (one basis per attempt). A positional code shows "
                  "the same picture on every frame whatever the frame holds; a code that mixes position and "
                  "content shows patterns that stay in place (stripes, a regular texture) from frame to frame; "
                  "features that follow content change with the frame and give one object one colour.")


def _measured(setup) -> str:
    return (f"log_p, log_p_shuffled: the exact objective on {setup.logp_pairs} held-out pairs, eval mode, each "
            f"attempt's own augmentation. jf_mean: J&F of label propagation on {setup.eval_sequences} held-out "
            f"synthetic sequences (higher is better); epe_mean: mean end-point error in pixels against the "
            f"exact flow at a gap of {setup.epe_gap} frames (lower is better; copy: the zero flow).")
