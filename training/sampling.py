"""The training data order: seeded, sharded over the processes, resumable mid-epoch, the same for any worker count.

- `ShardedEpochSampler` gives one process its batches of ``(epoch, index)`` pairs: a permutation of ``(seed, epoch)``,
  every ``num_replicas``-th index of it, starting at any batch.
- `SeededSampleDataset` seeds each sample's augmentation from ``(seed, epoch, index)``.
- `epoch_batches` is the endless stream of collated micro-batches the loop draws from, starting at any micro-step.

Together they make resume exact: which images a micro-step sees, and how they are augmented, depend only on the seed
and the micro-step, never on what ran before in the process.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch


class ShardedEpochSampler(torch.utils.data.Sampler[list[tuple[int, int]]]):
    """Batches of indices for one process: a seeded permutation per epoch, split across processes, resumable.

    The permutation depends only on ``(seed, epoch)``; process ``rank`` takes every ``num_replicas``-th index of it,
    so the ranks see disjoint images, and the last incomplete batch is dropped so every rank does the same number of
    steps. ``start_batch`` skips the batches already consumed (exact resume).
    """

    def __init__(self, num_samples: int, batch_size: int, num_replicas: int, rank: int, seed: int) -> None:
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch, self.start_batch = 0, 0
        self.batches_per_epoch = (num_samples // num_replicas) // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{num_samples} training images cannot fill one batch of {batch_size} on each of {num_replicas} "
                "processes; lower --per-device-batch-size or use more data"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        mine = order[self.rank :: self.num_replicas]
        for batch_index in range(self.start_batch, self.batches_per_epoch):
            yield [
                (self.epoch, index)
                for index in mine[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
            ]


class SeededSampleDataset(torch.utils.data.Dataset):
    """Wraps a training dataset so each sample's augmentation draws from an RNG seeded by (seed, epoch, index).

    Indices are ``(epoch, index)`` pairs (from `ShardedEpochSampler`). The global ``random``, ``numpy`` and ``torch``
    RNGs are seeded for the duration of the item and restored afterwards, so augmentation is reproducible whatever
    process or worker computes it, and the training RNG stream (point sampling) is left untouched.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        sample_seed = (self.seed * 1_000_003 + epoch * 10_007 + index) % (2**31)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(sample_seed)
            np.random.seed(sample_seed)
            torch.manual_seed(sample_seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)


def epoch_batches(
    dataset: SeededSampleDataset,
    sampler: ShardedEpochSampler,
    collate_fn: Callable[[list[Any]], Any],
    num_workers: int,
    seed: int,
    start_micro_step: int = 0,
) -> Iterator[Any]:
    """Collated micro-batches of this process from micro-step ``start_micro_step`` on, epoch after epoch, forever.

    Each epoch gets a fresh DataLoader whose worker seeds come from ``seed + epoch`` (never from the global RNG, so
    the training RNG stream does not depend on the number of workers).
    """
    epoch, start = divmod(start_micro_step, sampler.batches_per_epoch)
    generator = torch.Generator()
    while True:
        sampler.set_epoch(epoch, start)
        generator.manual_seed(seed + epoch)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate_fn,
            num_workers=num_workers,
            generator=generator,
            persistent_workers=False,
        )
        yield from loader
        epoch, start = epoch + 1, 0
