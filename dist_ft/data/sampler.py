"""Epoch orders that are a function of (seed, epoch), split across ranks, resumable.

Training: every rank sees ``ceil(n / world)`` samples a epoch (the permutation is padded by
wrapping, as DistributedSampler does), so ranks step in lockstep. Evaluation
(``pad=False``): rank ``r`` takes positions ``r, r + world, ...`` of the unshuffled order,
so every sample is seen exactly once across ranks. ``start`` skips the first samples of
this rank's share, which is how a resumed run continues at the exact next batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global order of ``n`` samples in ``epoch`` (identical on every rank)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


class ShardedSampler(Sampler[int]):
    """This rank's share of each epoch's order.

    Args:
        n: dataset length.
        rank, world: this process and the number of processes.
        seed: base of every epoch's permutation.
        shuffle: permute each epoch (training) or keep order (evaluation).
        pad: give every rank the same count by wrapping around (training).
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True, pad: bool = True) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of {world}")
        self.n, self.rank, self.world = n, rank, world
        self.seed, self.shuffle, self.pad = seed, shuffle, pad
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch, and skip this rank's first ``start`` samples (resume)."""
        self.epoch, self.start = epoch, start

    def indices(self) -> np.ndarray:
        """This rank's indices for the current epoch, ``start`` included."""
        order = epoch_order(self.n, self.seed, self.epoch, self.shuffle)
        if self.pad and self.n:
            total = math.ceil(self.n / self.world) * self.world
            order = np.resize(order, total)  # wraps around, like DistributedSampler
        return order[self.rank :: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start :].tolist())

    def __len__(self) -> int:
        return max(0, len(self.indices()) - self.start)
