"""What the demo and the ablation share: the setup (data, network, budget, held-out
evaluation), the held-out synthetic scenes and their flow pairs, the
training config of a run, and matching one flow pair.

The setup's defaults were chosen by measurement: see ``docs/experiments.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from fmapicon.data.flow import FlowPair


@dataclass(frozen=True)
class DemoSetup:
    """What the demo trains and evaluates with; the defaults fit ~10 minutes on 2 CPU cores.

    size : training frames S x S (the loss costs O(S^4) per pair)
    render : synthetic scenes are rendered at R x R; the training scale is S / R
    batch, channels, lr, max_gap, lambda_init : as ``fmapicon train``
    scenes, frames, objects : the synthetic training set (rendered on the fly)
    minutes : wall-clock cap of training
    steps : optimizer steps; held-out J&F peaks early while EPE keeps improving (see
        ``docs/experiments.md``), so the demo stops at 300 steps, about 5 minutes on 2 idle cores
    eval_sequences, eval_frames : the held-out synthetic sequences (rendered at R x R too)
    epe_pairs, epe_gap : pairs (t, t + gap) per held-out sequence for the end-point error
    workers : DataLoader processes rendering the scenes while the network trains
    """

    size: int = 32
    render: int = 32
    batch: int = 8
    channels: int = 64
    lr: float = 1e-3
    max_gap: int = 4
    lambda_init: float = 4.0
    scenes: int = 64
    frames: int = 40
    objects: int = 3
    minutes: float = 10.0
    steps: int = 300
    eval_sequences: int = 8
    eval_frames: int = 30
    epe_pairs: int = 5
    epe_gap: int = 4
    workers: int = 1
    log_every: int = 10

    @property
    def scale(self) -> float:
        """The training scale S / R at which the trained network is evaluated."""
        return self.size / self.render

    @property
    def eval_stride(self) -> int:
        """Feature cells on the held-out scenes: R / S pixels, one network output pixel each."""
        return max(1, round(self.render / self.size))


def with_budget(setup, minutes: float | None, steps: int | None):
    """``setup`` (a ``DemoSetup`` or a subclass) with the given ``minutes`` / ``steps``, where not None."""
    budget = {"minutes": None if minutes is None else float(minutes), "steps": None if steps is None else int(steps)}
    return dataclasses.replace(setup, **{key: value for key, value in budget.items() if value is not None})


# --------------------------------------------------------------------------- held-out scenes and runs


def data_seeds(seed: int) -> tuple[int, int]:
    """(training scenes' seed, held-out scenes' seed): odd and even, so they never coincide."""
    return 2 * seed + 1, 2 * seed + 2


def write_heldout(root: Path, setup: DemoSetup, seed: int) -> list[str]:
    """The held-out synthetic sequences, rendered at the training render size R."""
    from fmapicon.data.synth_layout import write_scenes

    return write_scenes(root, sequences=setup.eval_sequences, frames=setup.eval_frames,
                        size=(setup.render, setup.render), objects=setup.objects,
                        seed=data_seeds(seed)[1], set_name="val", video=False)


# The demo and the ablation train the ``original`` recipe (``fmapicon train --recipe original``)
# with the flags of ``recipe_changes``: size, batch and steps fit a few minutes on 2 CPU cores;
# lambda_init 4 and max_gap 4 were chosen on held-out synthetic scenes
# (docs/experiments.md).
TRAINING_RECIPE = "original"


def recipe_changes(setup: DemoSetup) -> dict:
    """The ``TrainConfig`` values in which the demo's training differs from ``TRAINING_RECIPE``."""
    from fmapicon.train import TrainConfig

    base = TrainConfig.for_recipe(TRAINING_RECIPE)
    wanted = {"size": setup.size, "batch": setup.batch, "channels": setup.channels, "lr": setup.lr,
              "max_gap": setup.max_gap, "lambda_init": setup.lambda_init, "steps": setup.steps}
    return {key: value for key, value in wanted.items() if getattr(base, key) != value}


def train_config(config, setup: DemoSetup):
    """The ``TrainConfig`` of the demo's run: ``TRAINING_RECIPE`` with ``recipe_changes``, on
    synthetic scenes rendered on the fly (or ``config.data``); ``config`` gives ``data``,
    ``seed`` and ``device`` (a demo's or an ablation's config)."""
    from fmapicon.train import TrainConfig

    training_seed = data_seeds(config.seed)[0]
    data = list(config.data) or [f"synth:scenes={setup.scenes},frames={setup.frames},size={setup.render},"
                                 f"objects={setup.objects},seed={training_seed}"]
    return dataclasses.replace(TrainConfig.for_recipe(TRAINING_RECIPE), data=data, **recipe_changes(setup),
                               minutes=setup.minutes, workers=setup.workers, seed=config.seed, device=config.device,
                               log_every=setup.log_every, save_every=max(setup.steps, 1)).validate()


def propagation_params(stride: int | None = None):
    """The CRW protocol's defaults, with feature cells of ``stride`` pixels when given."""
    from fmapicon.evaluation.propagate import PropagationParams

    return PropagationParams() if stride is None else PropagationParams(stride=stride)


# --------------------------------------------------------------------------- flow pairs


def synthetic_pairs(setup: DemoSetup, seed: int) -> list[FlowPair]:
    """Frames (t, t + ``setup.epe_gap``) of the held-out scenes with their exact flow, evenly spread.

    The scenes are rebuilt from their seeds (the same as ``write_heldout``'s), so that the flow
    over a gap of several frames is exact (``SceneModel.flow``), not a chain of per-frame flows.
    """
    import numpy as np

    from fmapicon.data.synth import build_scene, scene_seed, sequence_name

    gap = min(setup.epe_gap, setup.eval_frames - 1)
    pairs = []
    for index in range(setup.eval_sequences):
        model = build_scene(scene_seed(data_seeds(seed)[1], index), setup.eval_frames,
                            (setup.render, setup.render), setup.objects)
        starts = np.linspace(0, setup.eval_frames - 1 - gap, min(setup.epe_pairs, setup.eval_frames - gap))
        for t in sorted(set(starts.round().astype(int).tolist())):
            pairs.append(FlowPair(f"{sequence_name(index)}/{t:05d}+{gap}", model.render(t)[0],
                                  model.render(t + gap)[0], model.flow(t, model.ids(t), gap), "synth"))
    return pairs


def match_pair(model, pair: FlowPair, stride: int):
    """``fmapicon.evaluation.correspond.Match`` of a pair (argmax maps, as ``fmapicon match``'s default)."""
    from fmapicon.data.images import to_tensor
    from fmapicon.evaluation.correspond import match_images

    device = model.device
    return match_images(model, to_tensor(pair.a, device)[None], to_tensor(pair.b, device)[None], stride=stride)
