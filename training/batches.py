"""Reproducible batches: a seeded order per epoch that a resumed run can re-enter mid-epoch.

A training example is ``(input_ids [L] int64, text_mask [L], frames [T, 3, S, S] float32, frame_mask [T],
video_id)``. For a map-style dataset, epoch ``e`` visits ``randperm(len, seed=(seed, e))`` in full batches (the
last partial batch is dropped: InfoNCE wants equal batches), or, given an *epoch sampler* (an index sampler
with ``set_epoch``, deterministic per epoch, such as ``hbi_training.data.RandomCaptionSampler`` which keeps two
captions of one video out of a batch), the order that sampler gives for epoch ``e``. Resuming after ``k``
batches of that epoch skips exactly those ``k`` batches without loading them. An iterable dataset is read in its own order and the skipped
batches are read and dropped. DataLoader workers get seeds derived from ``(seed, epoch)``, so the order and any
worker-side randomness repeat run to run (a resumed run re-creates the workers, so worker-side randomness inside
a partly consumed epoch is exact only with ``num_workers=0``).
"""

from __future__ import annotations

import itertools
import random
from typing import Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from hbi_runtime.errors import UsageError


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (1 << 63)


class EpochSampler(Protocol):
    """An index sampler whose order is a function of the epoch (like ``DistributedSampler``)."""

    def set_epoch(self, epoch: int) -> None: ...
    def __iter__(self) -> Iterator[int]: ...


class EpochBatchSampler(Sampler[list[int]]):
    """Full batches of one epoch's order, from batch ``skip`` on (the last partial batch is dropped).

    The order is ``sampler``'s for ``epoch`` when given, else a seeded permutation of ``range(n)``.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, skip: int = 0,
                 sampler: EpochSampler | None = None) -> None:
        if sampler is not None:
            sampler.set_epoch(epoch)
            self.order = list(sampler)
        else:
            generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
            self.order = torch.randperm(n, generator=generator).tolist()
        self.batch_size, self.skip = batch_size, skip

    def __len__(self) -> int:
        return max(len(self.order) // self.batch_size - self.skip, 0)

    def __iter__(self) -> Iterator[list[int]]:
        for b in range(self.skip, len(self.order) // self.batch_size):
            yield self.order[b * self.batch_size:(b + 1) * self.batch_size]


def _seed_worker(worker_id: int) -> None:
    s = torch.initial_seed() % (1 << 32)  # set by the DataLoader from its seeded generator
    np.random.seed(s)
    random.seed(s)


def batches_per_epoch(dataset: Dataset, batch_size: int, sampler: EpochSampler | None = None) -> int | None:
    """Full batches per epoch of a map-style dataset; None for an iterable one."""
    if isinstance(dataset, IterableDataset):
        return None
    return (len(sampler) if sampler is not None else len(dataset)) // batch_size


def epoch_batches(dataset: Dataset, batch_size: int, *, seed: int, epoch: int, skip: int = 0,
                  sampler: EpochSampler | None = None, num_workers: int = 0, pin_memory: bool = False) -> Iterator:
    """The batches of one epoch, starting after ``skip`` batches (see module docstring)."""
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch) ^ 0x5EED)
    common = dict(num_workers=num_workers, worker_init_fn=_seed_worker, generator=generator,
                  pin_memory=pin_memory, persistent_workers=False)
    if isinstance(dataset, IterableDataset):
        loader = DataLoader(dataset, batch_size=batch_size, drop_last=True, **common)
        return itertools.islice(iter(loader), skip, None)
    if batches_per_epoch(dataset, batch_size, sampler) == 0:
        raise UsageError(f"the training set has fewer examples per epoch than one batch of {batch_size}",
                         hint="lower --batch-size or use a larger dataset")
    batches = EpochBatchSampler(len(dataset), batch_size, seed, epoch, skip, sampler)
    return iter(DataLoader(dataset, batch_sampler=batches, **common))
