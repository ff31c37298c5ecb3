"""The main job: ``fmapicon demo``, from nothing to a report that shows FeatureMapICON working.

One call of ``run_demo(DemoConfig(...))``:

1. **scenes**: writes held-out synthetic sequences (``DIR/heldout``, DAVIS-2017 layout with
   exact masks and flow) from a seed that training never sees;
2. **training**: trains a ``short`` U-Net with attempt 3 of the writeup (roll+affine augmentation,
   PixelCenter, NormScale, RMSprop) for 300 steps, capped at ``--minutes``, on synthetic
   scenes rendered on the fly (or on ``--data``), into ``DIR/run`` (a complete run folder
   of ``fmapicon train``, the only checkpoint folder under DIR);
3. **label propagation**: J&F on the held-out sequences (and on a DAVIS folder with
   ``--davis``) for the trained model and the ``copy``, ``pixels`` and ``random``
   baselines, all through the same protocol (``fmapicon.evaluation.propagate``);
4. **correspondence**: end-point error of Phi^AB against the exact synthetic flow (and on
   FlyingChairs-style pairs with ``--pairs``), and the inverse-consistency error
   |Phi^AB(Phi^BA(x)) - x|;
5. **report**: ``DIR/results.json`` and ``DIR/report.html`` (one self-contained page:
   curves, the results table, propagated masks, PCA-colour features, the
   inverse-consistency error map), with the PNGs also kept in ``DIR/figures``.

Training is the ``original`` recipe with the flags of ``shared.recipe_changes`` (``--size 32
--batch 8 --max-gap 4 --lambda-init 4 --steps 300``), on scenes rendered at R = 32 (training
scale 1, feature cells of one pixel): sized for a 2-core CPU, lambda and gap chosen on
held-out scenes (``docs/experiments.md``). The setup (``shared.DemoSetup``) holds those
values with the data and the held-out evaluation.
PixelCenter's running mean in the weights file is the one recomputed at the final weights
(``fmapicon.core.networks.calibrate_pixel_center``).

``copy`` repeats the first mask; as a correspondence it is the zero flow (nothing moves),
which is what its EPE reports.

A DIR that already holds files is refused (results of two runs never mix) unless
``force``, which replaces the demo's own outputs once the new ones are complete and leaves
other files alone: everything is built in a staging folder (``fmapicon.runtime.staged_output``),
so a demo that fails or is interrupted leaves DIR as it was.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from fmapicon.data.flow import FlowPair, flow_pairs
from fmapicon.experiments.shared import (TRAINING_RECIPE, DemoSetup, match_pair, propagation_params, recipe_changes,
                                         synthetic_pairs, train_config, with_budget, write_heldout)
from fmapicon.paths import display_path
from fmapicon.runtime import write_json

#: the models of the results, in the order of the table
MODELS = ("trained", "reference", "copy", "pixels", "random")

#: what the demo writes under DIR (and --force replaces)
OUTPUTS = ("run", "heldout", "eval", "figures", "report.html", "results.json", "demo.json")

_DESCRIPTIONS = {
    "trained": "short U-Net trained with FeatureMapICON (roll+affine, PixelCenter)",
    "reference": "the model shipped in the package (resnet-s4, trained on DAVIS-2016 video; not retrained); its J&F "
                 "at its recorded default, fused with the pixels baseline at W = 0.85",
    "copy": "first mask repeated; as a flow: zero motion",
    "pixels": "Lab colour patches (3 x 3 cells)",
    "random": "the same U-Net, untrained (random weights)",
}


#: the whole pipeline in about a minute (tests, CI): tiny, but every stage runs
QUICK = DemoSetup(size=24, render=24, batch=4, channels=32, scenes=8, frames=12, minutes=1.5, steps=30,
               eval_sequences=2, eval_frames=8, epe_pairs=2, epe_gap=3, workers=0, log_every=5)


@dataclass
class DemoConfig:
    """The options of ``fmapicon demo`` (see ``cli/demo.py`` for their help)."""

    out: str = "runs/demo"
    data: list = field(default_factory=list)
    minutes: float | None = None
    steps: int | None = None
    davis: str | None = None
    davis_set: str | None = None
    pairs: str | None = None
    quick: bool = False
    force: bool = False
    device: str = "auto"
    seed: int = 0
    progress: bool = True

    def setup(self) -> DemoSetup:
        """The setup with this run's budget applied."""
        return with_budget(QUICK if self.quick else DemoSetup(), self.minutes, self.steps)


# --------------------------------------------------------------------------- results


def _finite(value):
    """A float for JSON, or None for a missing / non-finite figure."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- stages


def model_spec(name: str, run: Path) -> str:
    """What ``fmapicon.evaluation.davis_eval.evaluate_davis`` and ``features.load_model`` take for a model."""
    return str(run) if name == "trained" else name


def propagation_scores(run: Path, root: Path, set_name: str, out: Path, params, device, progress: bool) -> dict:
    """J&F-Mean of each model on a DAVIS-layout folder: ``{model: {"jf_mean", "j_mean", "f_mean", "eval_dir"}}``."""
    from fmapicon.evaluation.davis_eval import evaluate_davis

    scores = {}
    for name in MODELS:
        result = evaluate_davis(model_spec(name, run), root, out / name, set_name=set_name, params=params,
                                device=device, progress=progress)
        overall = result.get("global", {})
        scores[name] = {"jf_mean": _finite(result["jf_mean"]), "j_mean": _finite(overall.get("J-Mean")),
                        "f_mean": _finite(overall.get("F-Mean")), "eval_dir": str(out / name),
                        "seconds": _finite(result.get("totals", {}).get("features_s", 0.0)
                                           + result.get("totals", {}).get("propagation_s", 0.0))}
    return scores


# --------------------------------------------------------------------------- correspondence


def chairs_pairs(folder) -> list[FlowPair]:
    """The FlyingChairs-style pairs of ``folder`` (``flow_pairs``), read into memory."""
    return [pair.load() for pair in flow_pairs(folder)]


def load_feature_models(run: Path, stride: int, device) -> dict:
    """The feature models of the correspondence comparison (copy has none: it is the zero flow)."""
    from fmapicon.evaluation.features import load_model

    return {"trained": load_model(str(run), device), "pixels": load_model("pixels", device, stride=stride),
            "random": load_model("random", device), "reference": load_model("reference", device)}


def correspondence_scores(models: dict, pairs: list[FlowPair], stride: int) -> dict:
    """Mean EPE (pixels, over all pixels of all pairs) and mean inverse-consistency error per model."""
    import numpy as np

    from fmapicon.data.flow import epe_stats

    scores = {}
    for name in MODELS:
        epe, ic = [], []
        for pair in pairs:
            if name == "copy":
                flow = np.zeros_like(pair.flow)
            else:
                match = match_pair(models[name], pair, stride)
                flow = match.flow_ab[0].permute(1, 2, 0).cpu().numpy()
                ic.append(float(match.ic_error.mean()))
            epe.append(epe_stats(flow, pair.flow)["epe_mean"])
        scores[name] = {"epe_mean": _finite(np.mean(epe)), "ic_error_mean": _finite(np.mean(ic)) if ic else None}
    return scores


# --------------------------------------------------------------------------- the whole job


def run_demo(config: DemoConfig, say=print) -> dict:
    """Run the demo pipeline; return the results written to ``DIR/results.json``."""
    from fmapicon.runtime import resolve_device, staged_output

    setup = config.setup()
    out = Path(config.out)
    device = resolve_device(config.device)
    if config.davis:
        from fmapicon.data.davis import resolve_set

        davis_set = resolve_set(config.davis, config.davis_set, "--davis-set")
    else:
        davis_set = None
    with staged_output(out, force=config.force, outputs=OUTPUTS, what="the earlier demo", last=("demo.json",)) as work:
        return _run_stages(config, setup, work, out, device, davis_set, say)


def _run_stages(config: DemoConfig, setup, work: Path, out: Path, device, davis_set, say) -> dict:
    """The demo's five stages, written into ``work`` (the staging folder published as ``out``)."""
    from fmapicon.runtime import unstaged
    from fmapicon.train import train

    write_json(work / "demo.json", {"status": "running", "config": dataclasses.asdict(config),
                                     "recipe": dataclasses.asdict(setup)})
    timings, started = {}, time.monotonic()

    def stage(name):
        timings[name] = round(time.monotonic() - stage.last, 2)
        stage.last = time.monotonic()

    stage.last = started
    say(f"[1/5] writing {setup.eval_sequences} held-out synthetic sequences to {display_path(out / 'heldout')}")
    write_heldout(work / "heldout", setup, config.seed)
    stage("heldout_scenes_s")
    flags = " ".join(f"--{key.replace('_', '-')} {value:g}" for key, value in recipe_changes(setup).items())
    say(f"[2/5] training: fmapicon train --recipe {TRAINING_RECIPE} {flags} (sized for 2 CPU cores), "
        f"at most {setup.minutes:g} min, into {display_path(out / 'run')}")
    training = train_config(config, setup)
    run = train(training, work / "run", progress=config.progress)
    stage("train_s")
    done = _trained_steps(run)
    if done is not None and setup.steps and done < setup.steps:
        say(f"      the {setup.minutes:g}-minute cap stopped training after {done} of {setup.steps} steps (a slow "
            "or busy machine): the scores below are of that network")
    say("[3/5] label propagation (J&F) on the held-out scenes: " + ", ".join(MODELS))
    synth = propagation_scores(run, work / "heldout", "val", work / "eval" / "synth",
                               propagation_params(setup.eval_stride), device, config.progress)
    stage("propagation_synth_s")
    davis = None
    if config.davis:
        say(f"      and on DAVIS {display_path(config.davis)} (set {davis_set}) with the default protocol")
        davis = propagation_scores(run, Path(config.davis), davis_set, work / "eval" / "davis",
                                   propagation_params(), device, config.progress)
        stage("propagation_davis_s")
    say("[4/5] correspondence: end-point error against the exact flow, inverse-consistency error")
    models = load_feature_models(run, setup.eval_stride, device)
    synth_pairs = synthetic_pairs(setup, config.seed)
    flow_synth = correspondence_scores(models, synth_pairs, setup.eval_stride)
    chairs = chairs_pairs(config.pairs) if config.pairs else None
    flow_chairs = correspondence_scores(models, chairs, 4) if chairs else None
    stage("correspondence_s")
    # the results name the published folder, never the staging one
    results = unstaged(assemble_results(config, setup, run, synth, davis, flow_synth, flow_chairs, timings),
                       work, out)
    say("[5/5] writing the report")
    write_report(work, results, models, synth_pairs, davis_set if config.davis else None)
    stage("report_s")
    timings["total_s"] = round(time.monotonic() - started, 2)
    write_json(work / "results.json", results)
    write_json(work / "demo.json", {"status": "done", "config": dataclasses.asdict(config),
                                     "recipe": dataclasses.asdict(setup), "timings": timings})
    return results


def _trained_steps(run) -> int | None:
    """The last step that a run's metrics record (None when none is)."""
    from fmapicon.experiments.figures import read_metrics

    steps = [r["step"] for r in read_metrics(run) if r.get("step") is not None]
    return int(steps[-1]) if steps else None


def assemble_results(config, setup, run, synth, davis, flow_synth, flow_chairs, timings) -> dict:
    """``{"models": {name: {...}}, ...}``; None where a figure does not apply or was not asked for."""
    from fmapicon.runtime import machine_info
    from fmapicon.experiments.figures import read_metrics

    models = {}
    for name in MODELS:
        models[name] = {
            "jf_mean": synth[name]["jf_mean"],
            "epe_mean": flow_synth[name]["epe_mean"],
            "ic_error_mean": flow_synth[name]["ic_error_mean"],
            "davis_jf_mean": davis[name]["jf_mean"] if davis else None,
            "pairs_epe_mean": flow_chairs[name]["epe_mean"] if flow_chairs else None,
            "description": _DESCRIPTIONS[name],
        }
    records = [r for r in read_metrics(run) if r.get("log_p") is not None]
    last = records[-1] if records else {}
    return {
        "models": models,
        "training": {"run": str(run), "steps": last.get("step"), "log_p": _finite(last.get("log_p")),
                     "log_p_shuffled": _finite(last.get("log_p_shuffled")),
                     "lambda": _finite(last.get("lambda")), "elapsed_s": _finite(last.get("elapsed_s")),
                     "input_scale": _run_config(run).get("input_scale"),
                     "recipe": TRAINING_RECIPE, "changed": recipe_changes(setup)},
        "synthetic": {"root": str(Path(config.out) / "heldout"), "sequences": setup.eval_sequences,
                      "frames": setup.eval_frames, "size": setup.render, "stride": setup.eval_stride,
                      "per_model": synth},
        "davis": {"root": config.davis, "per_model": davis} if davis else None,
        "pairs": {"root": config.pairs, "per_model": flow_chairs} if flow_chairs else None,
        "recipe": dataclasses.asdict(setup),
        "config": dataclasses.asdict(config),
        "timings": timings,
        "machine": machine_info(),
    }


def _run_config(run: Path) -> dict:
    path = Path(run) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


# --------------------------------------------------------------------------- the report


def write_report(out: Path, results: dict, models: dict, pairs: list[FlowPair], davis_set: str | None) -> Path:
    """``DIR/report.html`` (self-contained) from the results and pictures written to ``DIR/figures``."""
    from fmapicon.experiments import figures as pictures
    from fmapicon.experiments import report

    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    run = out / "run"
    sections = [report.Section("Results", text=_summary_text(results), html=results_table(results))]
    curves = pictures.plot_training_curves(run, figures / "training_curves.png", title="training of the demo's run")
    sections.append(report.Section("Training", text=_CURVES_TEXT, images=[(curves, "loss and log_p per step")]))
    heldout = out / "heldout"
    masks = [(mask_figure(heldout, "val", out / "eval" / "synth", figures / "masks_synthetic.png"),
              "held-out synthetic sequence: ground truth and each model's propagated masks")]
    davis_root = Path(results["davis"]["root"]) if results.get("davis") else None
    if davis_root is not None:
        masks.append((mask_figure(davis_root, davis_set, out / "eval" / "davis", figures / "masks_davis.png"),
                      "DAVIS: ground truth and each model's propagated masks"))
    sections.append(report.Section("Propagated masks", text=_MASKS_TEXT, images=masks))
    pca = feature_figure(models, heldout, davis_root, davis_set, results["synthetic"]["stride"],
                         figures / "features_pca.png")
    sections.append(report.Section("Features", text=_PCA_TEXT, images=[(pca, "PCA colours of the features")]))
    flows, errors = correspondence_figures(models, pairs[0], results["synthetic"]["stride"], figures)
    sections.append(report.Section("Correspondence", text=_FLOW_TEXT,
                                   images=[(flows, "flows of one held-out pair"), *errors]))
    sections.append(report.Section("Reproduce", html=_reproduce_html(results)))
    meta = report.machine_line(results["machine"], sum(results["timings"].values()))  # every stage up to the report
    return report.write_html(out / "report.html", "FeatureMapICON demo", sections, meta=meta)


_CURVES_TEXT = ("Left: the training loss, -log P (with the 1e-4 floor of the original). Right: log_p on the "
                "step's true pairs and log_p_shuffled on pairs whose frame B comes from another video. A model "
                "that learned appearance scores true pairs well above shuffled ones; equal curves would mean a "
                "positional code (attempt 0 of the writeup).")
_MASKS_TEXT = ("The first frame's masks are given; every later frame's masks are propagated through the video "
               "with the CRW protocol (context: the first frame and the 20 previous frames; top-10 affinities "
               "within a radius of 12 feature cells; temperature 0.05). Colours: the DAVIS palette.")
_PCA_TEXT = ("Each feature vector (C channels) projected on its model's top three principal components, shown "
             "as red, green and blue (one basis per model, shared by its pictures, so equal colours mean equal "
             "features). Good features give one object one colour and tell neighbouring objects apart.")
_FLOW_TEXT = ("Phi^AB by argmax of feature similarity (Middlebury colours: hue = direction, saturation = length, "
              "all scaled to the true flow's maximum), and the inverse-consistency error |Phi^AB(Phi^BA(y)) - y| "
              "on B's pixels, which training drives to zero.")


def _summary_text(results: dict) -> str:
    training, timings = results["training"], results["timings"]
    trained, copy, random = (results["models"][name] for name in ("trained", "copy", "random"))
    lines = [f"Trained for {training['steps']} steps ({(training.get('elapsed_s') or 0) / 60:.1f} min) at "
             f"{results['recipe']['size']} x {results['recipe']['size']} pixels, batch {results['recipe']['batch']}; "
             f"final log_p {_fmt(training['log_p'])} on true pairs vs {_fmt(training['log_p_shuffled'])} on "
             f"shuffled pairs (chance is -log N = {-math.log(results['recipe']['size'] ** 2):.2f})."]
    reference = results["models"]["reference"]
    if trained["jf_mean"] is not None and copy["jf_mean"] is not None:
        verdict = "above" if trained["jf_mean"] > max(copy["jf_mean"], random["jf_mean"] or 0) else "not above"
        lines.append(f"On {results['synthetic']['sequences']} held-out synthetic sequences the trained features "
                     f"reach J&F {_fmt(trained['jf_mean'])}, {verdict} copy ({_fmt(copy['jf_mean'])}) and random "
                     f"({_fmt(random['jf_mean'])}).")
    if reference.get("jf_mean") is not None:
        lines.append(f"The shipped reference model (trained on real video, not on these scenes) reaches "
                     f"{_fmt(reference['jf_mean'])} on the same held-out sequences"
                     + (f" and {_fmt(reference['davis_jf_mean'])} on DAVIS (trained: "
                        f"{_fmt(trained['davis_jf_mean'])})." if reference.get("davis_jf_mean") is not None else "."))
    if trained["epe_mean"] is not None and random["epe_mean"] is not None:
        pixels = results["models"]["pixels"]
        lines.append(f"Their correspondence end-point error is {_fmt(trained['epe_mean'])} px, "
                     f"{'below' if trained['epe_mean'] < random['epe_mean'] else 'not below'} random's "
                     f"({_fmt(random['epe_mean'])} px); zero flow: {_fmt(copy['epe_mean'])} px, pixels: "
                     f"{_fmt(pixels['epe_mean'])} px.")
    evaluation = sum(v for k, v in timings.items() if k.startswith(("propagation", "correspondence")))
    lines.append(f"J&F: higher is better (DAVIS J&F-Mean, the official toolkit's definition). EPE and "
                 f"inverse-consistency error: pixels, lower is better. Evaluation took {evaluation / 60:.1f} min.")
    return "\n\n".join(lines)


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def results_table(results: dict) -> str:
    """The HTML table of the four models (best J&F and lowest errors in bold)."""
    from fmapicon.experiments import report

    headers = {"model": "model", "description": "what it is", "jf_mean": "J&F synthetic",
               "epe_mean": "EPE synthetic (px)", "ic_error_mean": "IC error (px)",
               "davis_jf_mean": "J&F DAVIS", "pairs_epe_mean": "EPE pairs (px)"}
    columns = ["model", "description", "jf_mean", "epe_mean", "ic_error_mean"]
    columns += [c for c in ("davis_jf_mean", "pairs_epe_mean")
                if any(m[c] is not None for m in results["models"].values())]
    rows = [{"model": name, **results["models"][name]} for name in MODELS]
    best = {"jf_mean": "max", "davis_jf_mean": "max", "epe_mean": "min", "pairs_epe_mean": "min"}
    caption = ("J&F of label propagation (higher is better); EPE: mean end-point error of Phi^AB against the true "
               "flow; IC error: mean |Phi^AB(Phi^BA(y)) - y| (lower is better). Copy's EPE is the zero flow's.")
    return report.html_table(rows, columns, headers=headers, best=best, caption=caption)


def _reproduce_html(results: dict) -> str:
    import html

    config = results["config"]
    command = ["fmapicon demo", f"--out {config['out']}", f"--seed {config['seed']}"]
    command += ["--quick"] if config["quick"] else [f"--steps {results['recipe']['steps']}",
                                                     f"--minutes {results['recipe']['minutes']:g}"]
    command += [f"--davis {config['davis']}"] if config.get("davis") else []
    command += [f"--pairs {config['pairs']}"] if config.get("pairs") else []
    run = results["training"]["run"]
    lines = [" ".join(command), "",
             "# evaluate the trained run on a DAVIS folder with the default protocol:",
             f"fmapicon eval --davis DAVIS_ROOT --set val --model {run} --out {run}-davis"]
    return "<pre>" + html.escape("\n".join(lines)) + "</pre>"


def _sample_frames(count: int, length: int) -> list[int]:
    import numpy as np

    return sorted(set(np.linspace(0, length - 1, min(count, length)).round().astype(int).tolist()))


def mask_figure(root: Path, set_name: str, eval_dir: Path, path: Path, columns: int = 5) -> Path:
    """Rows: ground truth and each model's propagated masks over its frame; columns: frames of
    the first sequence of the set."""
    from fmapicon.data.davis import annotation_paths, frame_paths, layout, read_annotation, sequence_names
    from fmapicon.data.images import read_image
    from fmapicon.experiments import figures

    images, annotations = layout(root)
    name = sequence_names(root, set_name)[0]
    frames, truths = frame_paths(images, name), annotation_paths(annotations, name)
    chosen = _sample_frames(columns, len(frames))
    rows, labels = [], ["ground truth", *MODELS]
    for label in labels:
        row = []
        for index in chosen:
            frame = read_image(frames[index])
            ids = read_annotation(truths[index] if label == "ground truth"
                                  else eval_dir / label / name / f"{frames[index].stem}.png")
            row.append(figures.overlay_mask(frame, ids))
        rows.append(row)
    return figures.picture_grid(rows, path, row_labels=labels, column_labels=[f"{name} #{i}" for i in chosen],
                               cell_inches=2.4)


def _feature_frames(heldout: Path, davis_root: Path | None, davis_set: str | None) -> list:
    """(frame uint8, stride) for the PCA pictures: two held-out frames and one DAVIS frame."""
    from fmapicon.data.davis import frame_paths, layout, sequence_names
    from fmapicon.data.images import read_image

    images, _ = layout(heldout)
    names = sequence_names(heldout, "val")
    chosen = [(read_image(frame_paths(images, name)[0]), None) for name in names[:2]]
    if davis_root is not None:
        davis_images, _ = layout(davis_root)
        first = sequence_names(davis_root, davis_set)[0]
        chosen.append((read_image(frame_paths(davis_images, first)[0]), 8))
    return chosen


def feature_figure(models: dict, heldout: Path, davis_root, davis_set, stride: int, path: Path) -> Path:
    """One row per frame: the frame, then each model's PCA-colour features (the writeup's way of
    showing features), one PCA basis per model shared by its pictures."""
    from fmapicon.experiments import figures

    frames = [(frame, cell or stride) for frame, cell in _feature_frames(heldout, davis_root, davis_set)]
    names = ("trained", "reference", "random", "pixels")
    columns = {name: figures.feature_pictures(models[name], frames) for name in names}
    rows = [[frame, *(columns[name][index] for name in names)] for index, (frame, _) in enumerate(frames)]
    return figures.picture_grid(rows, path, column_labels=["frame", *names], cell_inches=2.4)


def correspondence_figures(models: dict, pair: FlowPair, stride: int, figures: Path):
    """A flow picture (A, B, true flow, each model's Phi^AB) and IC-error heat maps (trained, random)."""
    import numpy as np

    from fmapicon.data.flow import max_known_length
    from fmapicon.experiments import figures as pictures

    top = max_known_length(pair.flow) or 1.0
    row, labels, errors, matches = [pair.a, pair.b, pictures.flow_to_color(pair.flow, top)], ["A", "B", "true flow"], [], {}
    for name in ("trained", "reference", "pixels", "random"):
        matches[name] = match_pair(models[name], pair, stride)
        row.append(pictures.flow_to_color(matches[name].flow_ab[0].permute(1, 2, 0).cpu().numpy(), top))
        labels.append(f"{name} Phi^AB")
    flows = pictures.picture_grid([row], figures / "flows.png", column_labels=labels, cell_inches=1.8)
    # one colour scale for both maps, at the 99th percentile so that a few outliers do not blacken them
    vmax = max(float(np.percentile(m.ic_error.cpu().numpy(), 99)) for m in matches.values()) or 1.0
    for name in ("trained", "random"):
        heat = pictures.plot_heatmap(matches[name].ic_error[0].cpu().numpy(), figures / f"ic_error_{name}.png",
                                   f"{name}: inverse-consistency error", vmax=vmax)
        errors.append((heat, f"{name}: |Phi^AB(Phi^BA(y)) - y| on {pair.name}"))
    return flows, errors
