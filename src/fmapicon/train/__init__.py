"""Training: the loop, the run folder, resume, faults and data-parallel training.

``train(config, out_dir)`` maximizes the FeatureMapICON objective over pairs of frames
(A, B) of one video (``B x 3 x S x S`` in [0, 1]):

    log_p = mean_i log( sum_j softmax_j(a1_i . b2_j) softmax_i(a3_i . b4_j) + eps )
    loss  = -mean_batch log_p

where a1, b2, a3, b4 (``B x C x S x S``) are the network's feature maps under four
independent draws of the equivariant augmentation (``fmapicon.core.augment.four_draws``) and
eps = ``log_eps`` (the original's 1e-4 floor). One step = one global batch = one
optimizer update (unless skipped, see faults).

The run folder
--------------
``config.json``
    the resolved ``TrainConfig`` plus ``input_scale`` (``FramePairs.input_scale``: the
    scale at which evaluation shows frames to the model, that of the training crops),
    ``network`` (the ``NetworkConfig``), ``stride``, ``world_size``, ``fmapicon_version``,
    ``git_commit`` (when known), ``torch_version``.
``metrics.jsonl``
    one JSON object per logged step (every ``log_every`` steps, the last step always):
    ``step`` (steps done, from 1), ``loss``, ``log_p`` (the exact objective, eps = 0, on
    the step's batch), ``log_p_shuffled`` (the same features with B taken from another
    pair of the batch: B rolled by one; ``log_p ~ log_p_shuffled`` means the features
    are a positional code, attempt 0 of the writeup; null with a per-process batch of 1),
    ``lambda``, ``lr``, ``grad_norm`` (before clipping), ``pairs_per_s`` (since the
    previous line), ``bad_steps``, ``bad_steps_in_row``, ``epoch``, ``elapsed_s``; and
    ``jf_mean`` on evaluation steps. A skipped step writes a line with ``"event":
    "non_finite"``. Non-finite numbers are written as null.
``tensorboard/``
    the same scalars as TensorBoard events, when ``tensorboard`` is installed.
``checkpoints/last.safetensors``
    the network's weights and buffers, with the resolved config in the safetensors
    metadata, so the file alone loads (``fmapicon.load``). PixelCenter's running mean in
    it is recomputed at the saved weights on 128 fixed training frames (metadata
    ``pixel_center_calibration``; see ``networks.calibrate_pixel_center``): the trailing
    momentum mean left a positional residual that swamped eval-mode features.
    ``checkpoints/best.safetensors``: the best ``jf_mean`` so far (evaluated calibrated).
``checkpoints/state.pt``
    everything ``--resume`` needs: weights, optimizer, gradient scaler, step, data
    position (epoch, batches consumed), counters, RNG states of torch / numpy / python.
    It holds the weights too, so that one atomic rename makes a consistent checkpoint.
    Read back with ``torch.load(weights_only=True)``.

Every file is written through a temporary file and renamed (``runtime.atomic_write``):
a kill during a save leaves the previous checkpoint whole.

Reproducibility: the augmentation draws of step s on rank r come from a generator seeded
with (seed, r, s), and each epoch's data order from (seed, epoch); so a resumed run
repeats the uninterrupted run's next steps (bitwise on CPU, with the same thread count
and a dataset whose pairs depend only on its seed, epoch and index).

Faults
------
* SIGINT / SIGTERM: the current step finishes, a checkpoint is saved and
  ``TrainingInterrupted`` is raised (the command line exits 130 / 143); a second
  signal stops at once.
* A non-finite loss (or feature map) or gradient norm skips the step: no optimizer
  update, the gradients are dropped (under ``grad_accumulation="original"`` this clears
  the accumulated sum), the step still counts and is logged. After ``max_bad_steps`` in a
  row, ``TrainingDiverged`` is raised and the last checkpoint (the last good one) stays.
  Under fp16, a non-finite gradient is the gradient scaler's business (it lowers its
  scale and skips); those are counted as ``amp_skipped_steps``.
* An unwritable output folder or less than ``MIN_FREE_BYTES`` free (or four
  checkpoints' worth) is a ``UserError`` before any training.

Data-parallel training (``torchrun --nproc_per_node=K -m fmapicon train ...``)
--------------------------------------------------------------------------------
When ``WORLD_SIZE`` > 1 the process group is initialized from the environment (gloo on
CPU, nccl on CUDA, device ``cuda:LOCAL_RANK``), ``batch`` is the global batch (each rank
takes ``batch / world`` pairs of every global batch, so the global batches are the same
as in a one-process run), PixelCenter centres over the global batch, and
DistributedDataParallel wraps a module whose one forward runs the four draws. On CUDA,
BatchNorm becomes SyncBatchNorm; on CPU (gloo), where SyncBatchNorm is not supported,
batch norm uses per-rank statistics (and the saved running statistics are rank 0's).
Only rank 0 writes the run folder and shows progress; every rank reads
``checkpoints/state.pt`` on ``--resume``, so the run folder must be on a file system all
nodes share. torchrun forwards SIGTERM / SIGINT to the ranks, which finish the step and
save (torchrun itself then exits non-zero with its own message).

On a cluster, one torchrun per node with a rendezvous on the first node, e.g. 2 nodes
of 8 GPUs under SLURM (one task per node; ``--signal=TERM@120`` asks SLURM for a SIGTERM
two minutes before the time limit, enough to save)::

    srun --nodes=2 --ntasks-per-node=1 torchrun --nnodes=2 --nproc_per_node=8 \
        --rdzv-id=$SLURM_JOB_ID --rdzv-backend=c10d \
        --rdzv-endpoint=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1):29500 \
        -m fmapicon train --data /shared/videos --out /shared/runs/r1 --batch 64

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

from fmapicon.train.config import RECIPE_VALUES, RECIPES, RESUMABLE, TrainConfig, check_value, config_fields, load_config_file
from fmapicon.train.entry import train
from fmapicon.train.faults import TrainingDiverged, TrainingInterrupted
from fmapicon.train.run_folder import saved_config

__all__ = ["RECIPES", "RECIPE_VALUES", "RESUMABLE", "TrainConfig", "TrainingDiverged", "TrainingInterrupted",
           "check_value", "config_fields", "load_config_file", "saved_config", "train"]
