"""The data order and the batches of a run: ``GlobalBatches`` (per-epoch permutations cut into
global batches, each rank a slice) and ``DataStream`` (one DataLoader per epoch, from a
resumable position)."""

from __future__ import annotations

import signal

from fmapicon.errors import UserError
from fmapicon.train.config import TrainConfig
from fmapicon.train.random_streams import DATA_STREAM, stream_seed


class GlobalBatches:
    """The data order: each epoch a permutation seeded by (seed, epoch), cut into global
    batches of ``batch`` indices (the tail that does not fill one is dropped); rank r
    takes the r-th of ``world`` equal slices of each. The position (epoch, batches done)
    is all that resume needs, and the global batches do not depend on the world size.
    """

    def __init__(self, length: int, batch: int, rank: int, world: int, seed: int):
        if length < batch:
            raise UserError(f"the data has {length} pairs, fewer than one batch of {batch}; add data or "
                            "lower --batch")
        self.length, self.batch, self.rank, self.world, self.seed = length, batch, rank, world, seed

    @property
    def per_epoch(self) -> int:
        return self.length // self.batch

    def epoch(self, epoch: int, start: int = 0) -> list:
        """This rank's index lists for batches ``start, start + 1, ...`` of ``epoch``."""
        import torch

        generator = torch.Generator().manual_seed(stream_seed(self.seed, DATA_STREAM, epoch))
        order = torch.randperm(self.length, generator=generator)[: self.per_epoch * self.batch]
        share = self.batch // self.world
        batches = order.view(self.per_epoch, self.world, share)[start:, self.rank]
        return batches.tolist()


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C and SIGTERM to the main process, which finishes its
    step, saves and shuts them down: a terminal's Ctrl-C and torchrun's SIGTERM reach the
    whole process group, and a worker that died of it would fail the step instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_dataset(config: TrainConfig):
    from fmapicon.data.pairs import FramePairs

    return FramePairs(config.data, size=config.size, max_gap=config.max_gap, crop=config.crop, seed=config.seed,
                      crop_scale=(config.crop_min, config.crop_max))


def dataset_length(dataset) -> int:
    try:
        return len(dataset)
    except TypeError as error:
        raise UserError("the training data must be a map-style dataset with a length") from error


class DataStream:
    """Batches ``(A, B)`` (each ``b x 3 x S x S``, b = batch / world) from the position
    (epoch, batches done), forever, one DataLoader per epoch."""

    def __init__(self, dataset, order: GlobalBatches, workers: int, pin_memory: bool, seed: int):
        self.dataset, self.order, self.workers, self.pin_memory, self.seed = dataset, order, workers, pin_memory, seed
        self.epoch, self.position = 0, 0

    def __iter__(self):
        while True:
            yield from self._epoch_batches()
            self.epoch, self.position = self.epoch + 1, 0

    def _epoch_batches(self):
        for batch in self._loader(self.epoch, self.position):
            self.position += 1
            yield batch

    def _loader(self, epoch: int, start: int):
        import torch
        from torch.utils.data import DataLoader

        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        # seeds the workers from (seed, epoch), not from the global RNG, so that a resumed
        # epoch's workers are seeded as the uninterrupted run's were
        generator = torch.Generator().manual_seed(stream_seed(self.seed, DATA_STREAM, epoch, 1))
        return DataLoader(self.dataset, batch_sampler=self.order.epoch(epoch, start), num_workers=self.workers,
                          pin_memory=self.pin_memory, generator=generator,
                          worker_init_fn=_ignore_stop_signals if self.workers else None)
