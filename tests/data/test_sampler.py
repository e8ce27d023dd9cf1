"""Sharded epoch orders: disjoint shares, exact-once evaluation, (seed, epoch) determinism."""

from __future__ import annotations

import numpy as np

from dist_ft.data.sampler import ShardedSampler, epoch_order


def test_training_shares_are_disjoint_padded_and_deterministic() -> None:
    n, world = 103, 4
    shares = [ShardedSampler(n, r, world, seed=5) for r in range(world)]
    for s in shares:
        s.set_epoch(2)
    lists = [list(s) for s in shares]
    assert {len(x) for x in lists} == {26}  # ceil(103 / 4)
    union = [i for x in lists for i in x]
    assert set(union) == set(range(n)) and len(union) - n == 1  # one wrapped duplicate
    again = ShardedSampler(n, 1, world, seed=5)
    again.set_epoch(2)
    assert list(again) == lists[1]
    again.set_epoch(3)
    assert list(again) != lists[1]
    assert np.array_equal(epoch_order(n, 5, 2), epoch_order(n, 5, 2))


def test_evaluation_sees_every_sample_exactly_once() -> None:
    n, world = 10, 3
    shares = [list(ShardedSampler(n, r, world, shuffle=False, pad=False)) for r in range(world)]
    assert sorted(i for s in shares for i in s) == list(range(n))
    assert [len(s) for s in shares] == [4, 3, 3]


def test_resume_continues_at_the_next_sample() -> None:
    full = ShardedSampler(50, 1, 2, seed=1)
    full.set_epoch(4)
    order = list(full)
    resumed = ShardedSampler(50, 1, 2, seed=1)
    resumed.set_epoch(4, start=7)
    assert list(resumed) == order[7:] and len(resumed) == len(order) - 7
