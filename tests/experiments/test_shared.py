"""What the demo and the ablation share: held-out flow pairs, seeds, the run's config."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fmapicon.experiments import demo, shared


def test_synthetic_pairs_have_the_exact_flow_of_the_held_out_scenes(tmp_path):
    """The pairs are the held-out frames (as written to disk), and a one-frame gap gives
    exactly the scene's own per-frame flow (the file in Flow/)."""
    from fmapicon.data.images import read_image
    from fmapicon.data.flow import read_flo
    from fmapicon.data.synth import build_scene, scene_seed

    setup = shared.DemoSetup(render=32, eval_sequences=1, eval_frames=6, epe_pairs=3, epe_gap=1)
    shared.write_heldout(tmp_path, setup, seed=4)
    pairs = shared.synthetic_pairs(setup, seed=4)
    assert [p.name for p in pairs] == ["synth-0000/00000+1", "synth-0000/00002+1", "synth-0000/00004+1"]
    written = read_image(tmp_path / "JPEGImages" / "480p" / "synth-0000" / "00002.jpg").astype(int)
    # the same frame, up to JPEG: far closer to it than to another frame of the sequence
    assert np.abs(written - pairs[1].a.astype(int)).mean() < 0.5 * np.abs(written - pairs[0].a.astype(int)).mean()
    assert np.allclose(pairs[1].flow, read_flo(tmp_path / "Flow" / "synth-0000" / "00002.flo"), atol=1e-4)
    model = build_scene(scene_seed(shared.data_seeds(4)[1], 0), 6, (32, 32), 3)
    assert np.abs(model.flow(1, model.ids(1), gap=0)).max() < 1e-9
    # the frames of a gap-2 pair: the surface moves on, so the flow grows
    two = shared.synthetic_pairs(dataclasses.replace(setup, epe_gap=2, epe_pairs=1), seed=4)[0]
    assert np.abs(two.flow).mean() > np.abs(pairs[0].flow).mean()


def test_training_and_held_out_scenes_never_share_a_seed():
    seeds = [shared.data_seeds(s) for s in range(50)]
    assert not {train for train, _ in seeds} & {held for _, held in seeds}


def test_train_config_is_the_original_recipe_with_the_named_changes():
    """The demo trains a named preset: every training value that differs from ``--recipe
    original`` is one that ``recipe_changes`` names (besides data, budget, seed and logging)."""
    from fmapicon.train import TrainConfig

    config = shared.train_config(demo.DemoConfig(seed=3), shared.DemoSetup())
    changes = shared.recipe_changes(shared.DemoSetup())
    assert changes == {"size": 32, "batch": 8, "max_gap": 4, "lambda_init": 4.0, "steps": 300}
    original = TrainConfig.for_recipe(shared.TRAINING_RECIPE)
    differ = {f for f, v in config.to_dict().items() if v != getattr(original, f)}
    assert differ - {"data", "minutes", "workers", "seed", "log_every", "save_every"} == set(changes)
    assert (config.aug, config.center, config.net, config.optim) == ("roll+affine", True, "short", "rmsprop")
    assert config.size == shared.DemoSetup().size and config.minutes == shared.DemoSetup().minutes
    assert config.data == [f"synth:scenes=64,frames=40,size={shared.DemoSetup().render},objects=3,seed=7"]
    custom = shared.train_config(demo.DemoConfig(data=["videos/"], minutes=2.5, steps=7), demo.DemoConfig().setup())
    assert custom.data == ["videos/"]
    custom = shared.train_config(demo.DemoConfig(minutes=2.5, steps=7), demo.DemoConfig(minutes=2.5, steps=7).setup())
    assert (custom.minutes, custom.steps) == (2.5, 7)
