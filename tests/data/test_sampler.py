"""The step sampler: which rows each rank reads at each step, held (numpy) or computed (Feistel)."""

import numpy as np
import pytest

from clipdistill.data.sampler import LazyPermutation, StepSampler

POOL = np.arange(1000, 1096)[::-1].copy()  # sample ids need not be 0..n-1 or sorted


def test_ranks_slices_make_the_world_one_batch():
    one = StepSampler(POOL, 16, seed=3)
    ranks = [StepSampler(POOL, 16, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(15):  # crosses epoch boundaries (6 steps per epoch)
        parts = [s.indices(step) for s in ranks]
        assert all(len(p) == 8 for p in parts)
        assert np.array_equal(np.concatenate(parts), one.indices(step))


def test_resumed_schedule_equals_the_uninterrupted_one():
    full = list(StepSampler(POOL, 16, seed=3).schedule(0, 20))
    resumed = list(StepSampler(POOL, 16, seed=3).schedule(0, 7)) + list(
        StepSampler(POOL, 16, seed=3).schedule(7, 20)  # a fresh sampler, as after kill -9
    )
    assert all(np.array_equal(a, b) for a, b in zip(full, resumed, strict=True))
    assert not np.array_equal(full[0], list(StepSampler(POOL, 16, seed=4).schedule(0, 1))[0])


def test_each_epoch_is_a_permutation_of_the_pool():
    sampler = StepSampler(POOL, 16, seed=0)
    epochs = [np.concatenate([sampler.indices(e * 6 + i) for i in range(6)]) for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch.tolist()) == sorted(POOL.tolist())
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch


def test_epoch_with_a_remainder_has_no_repeats():
    pool = np.arange(100)
    sampler = StepSampler(pool, 16, seed=0)  # 6 full batches, 4 samples left out per epoch
    epoch = np.concatenate([sampler.indices(i) for i in range(6)])
    assert len(np.unique(epoch)) == 96 and set(epoch.tolist()) <= set(pool.tolist())


def test_sampler_rejects_bad_sizes():
    with pytest.raises(ValueError, match="not divisible"):
        StepSampler(POOL, 15, seed=0, world_size=2)
    with pytest.raises(ValueError, match="only 96 training samples"):
        StepSampler(POOL, 128, seed=0)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_lazy_permutation_is_a_bijection_fixed_by_its_seed(n):
    perm = LazyPermutation(n, [5, 0])
    values = perm[np.arange(n)]
    assert sorted(values.tolist()) == list(range(n))
    assert np.array_equal(LazyPermutation(n, [5, 0])[np.arange(n)], values)
    if n >= 17:
        assert not np.array_equal(values, np.arange(n))
        assert not np.array_equal(LazyPermutation(n, [5, 1])[np.arange(n)], values)


def test_lazy_permutation_at_corpus_scale_needs_no_table():
    n = 400_000_000
    perm = LazyPermutation(n, [0, 3])
    picks = perm[np.arange(10_000_000, 10_000_512)]
    assert len(np.unique(picks)) == 512 and picks.min() >= 0 and picks.max() < n
    assert np.array_equal(perm[np.array([10_000_100])], picks[100:101])  # any position alone, same value


@pytest.mark.parametrize("pool", [POOL, np.arange(100)])
def test_lazy_sampler_keeps_every_property_of_the_held_one(pool):
    """The lazy order differs from numpy's, but: ranks make the global batch, each epoch draws each
    sample at most once (once when the batch divides the pool), epochs differ, resume needs only the step."""
    one = StepSampler(pool, 16, seed=3, lazy_above=0)
    ranks = [StepSampler(pool, 16, seed=3, rank=r, world_size=4, lazy_above=0) for r in range(4)]
    assert one.lazy and all(r.lazy for r in ranks)
    per_epoch = one.steps_per_epoch
    epochs = []
    for epoch in range(3):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        for step in steps:
            assert np.array_equal(np.concatenate([r.indices(step) for r in ranks]), one.indices(step))
        epochs.append(np.concatenate([one.indices(s) for s in steps]))
        assert len(np.unique(epochs[-1])) == per_epoch * 16 and set(epochs[-1].tolist()) <= set(pool.tolist())
    assert not np.array_equal(epochs[0], epochs[1])
    fresh = StepSampler(pool, 16, seed=3, lazy_above=0)  # as after kill -9, asked for a later step first
    assert np.array_equal(fresh.indices(per_epoch + 2), one.indices(per_epoch + 2))


def test_small_pools_keep_numpys_order():
    """Below the threshold the order is numpy's permutation, the one the lab's results were made with."""
    sampler = StepSampler(POOL, 16, seed=3)
    assert not sampler.lazy
    expected = POOL[np.random.default_rng([3, 1]).permutation(len(POOL))[32:48]]
    assert np.array_equal(sampler.indices(sampler.steps_per_epoch + 2), expected)
