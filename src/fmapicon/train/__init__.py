"""Training: the loop, the run folder, resume, faults and data-parallel training.

``train(config, out_dir)`` maximizes the FeatureMapICON objective over pairs of frames
(A, B) of one video (``B x 3 x S x S`` in [0, 1]):

    log_p = mean_i log( sum_j softmax_j(a1_i . b2_j) softmax_i(a3_i . b4_j) + eps )
    loss  = -mean_batch log_p

where a1, b2, a3, b4 (``B x C x S x S``) are the network's feature maps under four
independent draws of the equivariant augmentation (``fmapicon.core.augment.four_draws``) and
eps = ``log_eps`` (the original's 1e-4 floor). One step = one global batch = one
optimizer update (unless skipped, see faults).

The parts: ``config`` (``TrainConfig``), ``run_folder`` (what a run writes: see its
docstring), ``faults`` (signals, non-finite steps, a full disk), ``distributed``
(data-parallel training under torchrun), ``random_streams`` (reproducibility and resume),
``data_stream``, ``model``, ``loop`` (``Trainer``) and ``entry`` (``train``).

Deviations from the original code
---------------------------------
* Gradients are cleared before each step (``grad_accumulation="off"``). The original
  never called ``zero_grad``, so every step clipped and applied the running *sum* of all
  past gradients; ``grad_accumulation="original"`` reproduces that.
* Affine swaps of T and T^-1 are per sample (see ``fmapicon.core.augment``).

From Python::

    from fmapicon.train import TrainConfig, train
    run = train(TrainConfig(size=64, batch=8, steps=200), "runs/small")
    model = fmapicon.load(run)          # unit features, eval mode
    train(None, run, resume=True)       # after an interruption: go on to the same total

This module imports only the standard library at load time (torch is imported inside
the functions), so that the command line can read ``TrainConfig`` for its ``--help``
without loading torch.
"""

from __future__ import annotations

from fmapicon.train.config import (RECIPE_VALUES, RECIPES, REMOVED_OPTIONS, RESUMABLE, TrainConfig, check_value,
                                   config_fields, load_config_file)
from fmapicon.train.entry import train
from fmapicon.train.faults import TrainingDiverged, TrainingInterrupted
from fmapicon.train.run_folder import saved_config

__all__ = ["RECIPES", "RECIPE_VALUES", "REMOVED_OPTIONS", "RESUMABLE", "TrainConfig", "TrainingDiverged", "TrainingInterrupted",
           "check_value", "config_fields", "load_config_file", "saved_config", "train"]
