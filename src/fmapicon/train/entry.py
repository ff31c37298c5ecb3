"""``train(config, out_dir)``: check, build, run and close one training run."""

from __future__ import annotations

from pathlib import Path

from fmapicon.errors import UserError
from fmapicon.train.config import TrainConfig, check_resumable
from fmapicon.train.distributed import barrier, close_processes, init_processes, rank_zero_error
from fmapicon.train.faults import StopRequests, TrainingInterrupted
from fmapicon.train.loop import Trainer
from fmapicon.train.model import amp_dtype
from fmapicon.train.run_folder import MIN_FREE_BYTES, MetricsLog, check_free_space, prepare_run_folder, saved_config


def train(config: TrainConfig | None, out_dir, resume: bool = False, *, force: bool = False,
          progress: bool = True) -> Path:
    """Train a feature network as ``config`` says, writing the run folder ``out_dir``.

    Parameters
    ----------
    config : TrainConfig
        With ``resume``, None (the run's own config) or a config equal to the run's
        except for ``steps`` (the new total), ``device``, ``workers`` and ``minutes``
        (``saved_config(out_dir)`` gives the saved one).
    out_dir : the run folder (created; a non-empty one needs ``resume`` or ``force``)
    resume : continue from ``out_dir/checkpoints/state.pt`` at the exact step
    force : replace the run files of a non-empty ``out_dir``
    progress : show a progress bar (rank 0)

    Returns
    -------
    The run folder. Raises ``TrainingInterrupted`` after saving when SIGINT / SIGTERM
    arrived, ``TrainingDiverged`` after ``max_bad_steps`` non-finite steps in a row.
    """
    run = Path(out_dir)
    if config is None and not resume:
        raise UserError("train needs a TrainConfig; config=None is only for resume=True (the run's own config)")
    config = (config or saved_config(run)).validate()
    processes, device = init_processes(config.device)
    try:
        amp_dtype(config, device)  # an impossible --amp fails before the folder is touched
        rank_zero_error(processes, lambda: _prepare(run, config, resume, force))
        trainer = Trainer(config, run, processes, device, progress)
        rank_zero_error(processes, lambda: check_free_space(run, _checkpoint_need(trainer.net)))
        signum = _run(trainer, run, resume)
        # every rank done (rank 0 writes the last files) before any tears the group down: gloo's
        # teardown while another rank still works aborted a rank now and then
        barrier(processes)
    finally:
        close_processes(processes)
    if signum is not None:
        raise TrainingInterrupted(signum, trainer.step, run)
    return run


def _prepare(run: Path, config: TrainConfig, resume: bool, force: bool) -> None:
    if config.eval_every:
        from fmapicon.data.davis import layout

        layout(config.davis)  # a wrong --davis fails now, not after hours of training
    prepare_run_folder(run, resume=resume, force=force)
    if resume:
        check_resumable(config, saved_config(run))


def _checkpoint_need(net) -> int:
    """Bytes to keep free: four copies of the weights (state with optimizer, last, best)."""
    size = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    return max(MIN_FREE_BYTES, 4 * 3 * size)


def _run(trainer: Trainer, run: Path, resume: bool) -> int | None:
    if resume:
        trainer.load_state()
    trainer.write_config()
    log = MetricsLog(run, trainer.step if resume else None) if trainer.processes.main else None
    try:
        with StopRequests() as stops:
            if not resume:
                trainer.save()  # a checkpoint from the start: a "last good" one always exists
            return trainer.run_loop(log, stops)
    finally:
        if log is not None:
            log.close()
