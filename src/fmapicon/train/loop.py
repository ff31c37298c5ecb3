"""The training loop: ``Trainer`` builds the model and data of one run, steps, logs, saves
and evaluates; ``StepResult`` is one step's record."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from fmapicon.errors import UserError
from fmapicon.runtime import json_text, write_json
from fmapicon.train.config import TrainConfig
from fmapicon.train.data_stream import DataStream, GlobalBatches, dataset_length, make_dataset
from fmapicon.train.distributed import Processes, barrier
from fmapicon.train.faults import StopRequests, TrainingDiverged
from fmapicon.train.model import amp_dtype, distributed_model, four_draw_module, init_network, init_weights, make_optimizer
from fmapicon.train.random_streams import AUGMENT_STREAM, rng_state, set_rng_state, stream_seed
from fmapicon.train.run_folder import (BEST_WEIGHTS, CALIBRATION_FRAMES, CHECKPOINT_DIR, CONFIG_FILE, LAST_WEIGHTS,
                                       SNAPSHOT_WEIGHTS, STATE_FILE, MetricsLog, git_commit)


@dataclass
class StepResult:
    """The terms of one training step, averaged over all processes (as ICON's loss record).

    loss : -mean log_p with the ``log_eps`` floor, the quantity minimized (non-finite on a bad step)
    grad_norm : L2 norm of all gradients before clipping; None when not computed
    bad : the step was non-finite: skipped (no update) and counted
    log_p, log_p_shuffled : the exact objective (eps = 0) on the step's pairs and on
        shuffled pairs (B rolled by one in the batch); None until measured (``Trainer.measured``,
        on logged steps) and on bad steps
    features : the detached feature maps (a1, b2, a3, b4) the diagnostics are measured on
    """

    loss: float
    grad_norm: float | None
    bad: bool = False
    log_p: float | None = None
    log_p_shuffled: float | None = None
    features: tuple = ()


class Trainer:
    """One training run: built once, then ``run()``; all state lives here."""

    def __init__(self, config: TrainConfig, run: Path, processes: Processes, device, progress: bool):
        import torch

        config, self.init_model = init_network(config)
        self.config, self.run, self.processes, self.device = config, run, processes, device
        self.progress = progress and processes.main
        self.dataset = make_dataset(config)
        with torch.random.fork_rng(devices=[]):  # seeded initial weights, the caller's RNG untouched
            torch.manual_seed(config.seed)  # the same on every rank
            self._build_model()
        self._build_data()
        self.step, self.saved_step, self.bad_steps, self.bad_in_row, self.amp_skipped = 0, None, 0, 0, 0
        self.best_jf: float | None = None
        self.calibration = None  # PixelCenter's calibration frames, drawn at the first save
        self.resolved = self._resolved_config()

    # ---------------------------------------------------------------- build

    def _build_model(self) -> None:
        import torch

        from fmapicon.core.augment import make_augmentation
        from fmapicon.core.networks import build_network, network_config

        self.network_config = network_config(self.config.to_dict())
        self.net = build_network(self.network_config)
        self.init_skipped = init_weights(self.net, self.init_model) if self.init_model is not None else []
        self.net.to(self.device)
        self.net.norm_scale.scale.requires_grad_(self.config.learn_lambda)
        if self.net.pixel_center is not None:
            self.net.pixel_center.global_batch = self.processes.distributed  # centre over the global batch
        self.augmentation = make_augmentation(self.config.aug, stride=self.net.stride)
        self.model = distributed_model(four_draw_module(self.net, self.augmentation), self.processes, self.device)
        if self.processes.distributed and self.device.type == "cuda":
            self.net = self.model.module.net  # the SyncBatchNorm copy
        self.optimizer = make_optimizer(self.config, self.net.parameters())
        self.amp_dtype = amp_dtype(self.config, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.config.amp == "fp16")
        self.generator = torch.Generator()  # reseeded every step: see stream_seed

    def _build_data(self) -> None:
        world = self.processes.world
        if self.config.batch % world:
            raise UserError(f"--batch {self.config.batch} is the global batch and must divide evenly over "
                            f"{world} processes; use a multiple of {world}")
        order = GlobalBatches(dataset_length(self.dataset), self.config.batch, self.processes.rank, world,
                              self.config.seed)
        self.data = DataStream(self.dataset, order, self.config.workers, self.device.type == "cuda",
                               self.config.seed)

    def _resolved_config(self) -> dict:
        import torch

        from fmapicon import __version__

        return {**self.config.to_dict(), "input_scale": getattr(self.dataset, "input_scale", None),
                "network": dataclasses.asdict(self.network_config), "stride": self.net.stride,
                "world_size": self.processes.world, "fmapicon_version": __version__,
                "git_commit": git_commit(), "torch_version": torch.__version__,
                "data_summary": _jsonable(getattr(self.dataset, "summary", None)), "init_weights": self._init_record()}

    def _init_record(self) -> dict | None:
        """Where the weights started (``--init``): the spec, its file and step, what was not copied."""
        if self.init_model is None:
            return None
        from fmapicon.core.checkpoint import saved_step, weights_file

        file = weights_file(self.config.init)
        return {"spec": self.config.init, "file": str(file), "step": saved_step(file), "not_copied": self.init_skipped}

    # ---------------------------------------------------------------- step

    def train_step(self, a, b) -> StepResult:
        """One step on this rank's share (``b x 3 x S x S`` each) of a global batch."""
        import torch

        if self.config.grad_accumulation == "off":
            self.optimizer.zero_grad(set_to_none=True)
        features, loss = self._forward(a.to(self.device, non_blocking=True), b.to(self.device, non_blocking=True))
        mean_loss = self._mean_over_processes(loss.detach())
        if not math.isfinite(mean_loss):  # agreed by all ranks: none runs backward
            return self._skip(mean_loss, None)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.clip if self.config.clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.net.parameters(), max_norm))
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            return self._skip(mean_loss, grad_norm)
        self._update(grad_norm)
        return StepResult(mean_loss, grad_norm, features=tuple(f.detach() for f in features))

    def _forward(self, a, b):
        """The four feature maps (float32) and the loss; a NaN loss when a map is not finite."""
        import torch

        from fmapicon.core import objective

        self.generator.manual_seed(stream_seed(self.config.seed, AUGMENT_STREAM, self.processes.rank, self.step + 1))
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            features = self.model(a, b, self.generator)
        features = tuple(f.float() for f in features)
        if not all(bool(torch.isfinite(f).all()) for f in features):
            return features, torch.full((), math.nan, device=self.device)
        log_p = objective.log_p(*features, eps=self.config.log_eps, check=False)  # checked above
        return features, -log_p.mean()

    def _mean_over_processes(self, value) -> float:
        if self.processes.distributed:
            import torch.distributed as dist

            value = value.clone()
            dist.all_reduce(value)
            value = value / self.processes.world
        return float(value)

    def _update(self, grad_norm: float) -> None:
        if not math.isfinite(grad_norm):  # fp16 overflow: the scaler skips and lowers its scale
            self.amp_skipped += 1
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _skip(self, loss: float, grad_norm: float | None) -> StepResult:
        """A non-finite step: no update, and its gradients are dropped."""
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, grad_norm, bad=True)

    # ---------------------------------------------------------------- log

    def measured(self, result: StepResult) -> StepResult:
        """``result`` with its exact log_p (eps = 0) on the step's pairs and on shuffled pairs (B
        rolled by one in the batch: A with another video's B), averaged over processes."""
        import torch

        from fmapicon.core import objective

        features = result.features
        with torch.no_grad():
            true = objective.log_p(*features, check=False).mean()
            shuffled = objective.log_p_shuffled(*features, check=False).mean() if len(features[0]) > 1 else None
        log_p = self._mean_over_processes(true)
        log_p_shuffled = None if shuffled is None else self._mean_over_processes(shuffled)
        return dataclasses.replace(result, log_p=log_p, log_p_shuffled=log_p_shuffled)

    def record(self, result: StepResult) -> dict:
        """The metrics line of this step: its terms and the run's counters; a bad step is marked
        ``"event": "non_finite"``; pairs/s over the steps since the previous line."""
        steps, seconds = self.step - self.window[0], time.monotonic() - self.window[1]
        rate = None if result.bad else steps * self.config.batch / max(seconds, 1e-9)
        return {"step": self.step, **({"event": "non_finite"} if result.bad else {}), "loss": result.loss,
                "log_p": result.log_p, "log_p_shuffled": result.log_p_shuffled,
                "lambda": float(self.net.lambda_), "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": result.grad_norm, "pairs_per_s": rate,
                "bad_steps": self.bad_steps, "bad_steps_in_row": self.bad_in_row,
                "amp_skipped_steps": self.amp_skipped, "epoch": self.data.epoch,
                "elapsed_s": time.monotonic() - self.started}

    # ---------------------------------------------------------------- save

    def save(self) -> None:
        """Write state.pt, then last.safetensors with a calibrated PixelCenter (rank 0 only;
        each atomically)."""
        self.saved_step = self.step
        if not self.processes.main:
            return
        import torch

        from fmapicon.core.checkpoint import save_weights
        from fmapicon.runtime import atomic_write

        folder = self.run / CHECKPOINT_DIR
        with atomic_write(folder / STATE_FILE) as handle:
            torch.save(self.state_dict(), handle)
        with self.calibrated() as calibration:
            metadata = {**self.weights_metadata(), **calibration}
            save_weights(self.net, folder / LAST_WEIGHTS, metadata)
            if self._snapshot_due():
                save_weights(self.net, folder / SNAPSHOT_WEIGHTS.format(step=self.step), metadata)

    @contextlib.contextmanager
    def calibrated(self):
        """PixelCenter's running mean recomputed at the current weights on a fixed sample of
        the training data (``CALIBRATION_FRAMES`` first frames, ``FramePairs.first_frames``)
        for the duration: what weights files and evaluations get. Yields the weights-file
        metadata that records it (``pixel_center_calibration``; empty without a PixelCenter).
        The training buffer comes back afterwards, so state.pt, and a resumed run, hold the
        same buffer as an uninterrupted run. Why: see ``networks.calibrate_pixel_center``."""
        from fmapicon.core.networks import calibrate_pixel_center

        center = self.net.pixel_center
        if center is None:
            yield {}
            return
        if self.calibration is None:
            self.calibration = self.dataset.first_frames(CALIBRATION_FRAMES)
        kept = center.running_mean.clone()
        try:
            calibrate_pixel_center(self.net, self.calibration)
            yield {"pixel_center_calibration": _metadata_json({"frames": len(self.calibration), "step": self.step})}
        finally:
            center.running_mean.copy_(kept)

    def weights_metadata(self) -> dict:
        return {"fmapicon_config": _metadata_json(self.resolved), "step": str(self.step)}

    def state_dict(self) -> dict:
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.data.epoch,
                "position": self.data.position, "bad_steps": self.bad_steps, "bad_in_row": self.bad_in_row,
                "amp_skipped": self.amp_skipped, "best_jf_mean": self.best_jf, "rng": rng_state(),
                "config": self.config.to_dict()}

    def load_state(self) -> None:
        """Continue from checkpoints/state.pt (every rank reads it)."""
        import torch

        state = torch.load(self.run / CHECKPOINT_DIR / STATE_FILE, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.bad_steps, self.bad_in_row = state["step"], state["bad_steps"], state["bad_in_row"]
        self.amp_skipped, self.best_jf = state["amp_skipped"], state["best_jf_mean"]
        self.data.epoch, self.data.position = state["epoch"], state["position"]
        self.saved_step = self.step
        set_rng_state(state["rng"])

    def write_config(self) -> None:
        if self.processes.main:
            write_json(self.run / CONFIG_FILE, self.resolved)

    # ---------------------------------------------------------------- evaluate

    def evaluate(self) -> dict:
        """Label propagation on ``config.davis`` (rank 0); keeps best.safetensors."""
        from fmapicon.core.checkpoint import save_weights

        with self.calibrated() as calibration:
            score = _evaluate_davis(self.net, self.config.davis, self.run / "eval" / f"step{self.step:07d}",
                                    self.resolved.get("input_scale"))
            if self.best_jf is None or score > self.best_jf:
                self.best_jf = score
                save_weights(self.net, self.run / CHECKPOINT_DIR / BEST_WEIGHTS,
                             {**self.weights_metadata(), **calibration, "jf_mean": str(score)})
        return {"jf_mean": score, "best_jf_mean": self.best_jf}

    # ---------------------------------------------------------------- run

    def run_loop(self, log: MetricsLog | None, stops: StopRequests) -> int | None:
        """Train until ``steps``, the time budget or a stop signal, then save; return the
        number of the signal that stopped it, or None."""
        from tqdm import tqdm

        self.started = time.monotonic()
        self.window = (self.step, self.started)  # step and time of the previous metrics line
        bar = tqdm(total=self.config.steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True)
        batches = iter(self.data)
        try:
            while self.step < self.config.steps:
                result = self.train_step(*next(batches))
                self.step += 1
                bar.update(1)
                final = self._should_stop(stops) or self.step == self.config.steps
                self._after_step(result, log, bar, final)
                if final:
                    break
        finally:
            bar.close()
            batches.close()
        self.save()
        return stops.signum

    def _after_step(self, result: StepResult, log, bar, final: bool) -> None:
        """Count a bad step, or log / evaluate / save on schedule (the final step is always logged)."""
        if result.bad:
            self._bad_step(result, log)
            return
        self.bad_in_row = 0
        evaluate = self.config.eval_every > 0 and self.step % self.config.eval_every == 0
        if final or evaluate or self.step % self.config.log_every == 0:
            self._log(result, log, bar, evaluate)
        if not final and (self._snapshot_due() or self.step % self.config.save_every == 0):
            self.save()

    def _snapshot_due(self) -> bool:
        """Whether this step's weights are kept as ``checkpoints/step-NNNNNN.safetensors``."""
        every = self.config.snapshot_every
        return every > 0 and self.step > 0 and self.step % every == 0

    def _log(self, result: StepResult, log, bar, evaluate: bool) -> None:
        record = self.record(self.measured(result))
        if evaluate:
            record.update(self._evaluate_on_rank_zero())
        if log is not None:
            log.write(record)
        bar.set_postfix(loss=f"{result.loss:.4f}", pairs_s=f"{record['pairs_per_s']:.1f}")
        self.window = (self.step, time.monotonic())

    def _bad_step(self, result: StepResult, log) -> None:
        self.bad_steps += 1
        self.bad_in_row += 1
        if log is not None:
            log.write(self.record(result))
        if self.bad_in_row >= self.config.max_bad_steps:
            raise TrainingDiverged(
                f"{self.bad_in_row} non-finite steps in a row (loss {result.loss}, gradient norm "
                f"{result.grad_norm}) at step {self.step}: stopped. The last good checkpoint (step "
                f"{self.saved_step}) is kept in {self.run / CHECKPOINT_DIR}; try a lower --lr, a --clip, or "
                "--amp off, then --resume it or start a new run")

    def _evaluate_on_rank_zero(self) -> dict:
        scores = self.evaluate() if self.processes.main else {}
        barrier(self.processes)
        self.net.train()
        return scores

    def _should_stop(self, stops: StopRequests) -> bool:
        """Stop on a signal (to any rank) or at the time budget; every rank agrees."""
        import torch

        over_time = self.config.minutes > 0 and time.monotonic() - self.started > 60 * self.config.minutes
        wants = float(stops.signum is not None or over_time)
        if self.processes.distributed:
            import torch.distributed as dist

            flag = torch.tensor([wants], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if float(flag) and not wants:
                stops.signum = signal.SIGTERM  # another rank was signalled: save and stop with it
            wants = float(flag)
        return bool(wants)


def _metadata_json(value) -> str:
    """One line of strict JSON for a safetensors metadata entry."""
    return json_text(value, indent=None).rstrip("\n")


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def _evaluate_davis(net, davis_root, out_dir: Path, input_scale) -> float:
    """J&F-Mean of label propagation (``fmapicon.evaluation.propagate``, the CRW protocol with its
    defaults) with ``net`` in eval mode at the training scale ``input_scale``.

    ``out_dir`` keeps the record (eval.json) and the toolkit CSVs; the predicted masks are
    written to a scratch folder and dropped, so evaluations do not pile up PNGs.
    """
    import tempfile

    from fmapicon.evaluation.features import FeatureModel
    from fmapicon.core.networks import UnitFeatures
    from fmapicon.evaluation.davis_eval import evaluate_davis

    device = next(net.parameters()).device
    model = FeatureModel(UnitFeatures(net), stride=net.stride, name="training network",
                         default_input_scale=input_scale or 1.0)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".predictions-") as scratch:
        results = evaluate_davis(model, davis_root, scratch, device=device, progress=False)
        for item in Path(scratch).iterdir():
            if item.is_file():
                os.replace(item, out_dir / item.name)
    return float(results["jf_mean"])
