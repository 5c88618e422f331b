"""Which samples training step `s` sees, as a pure function of (seed, epoch, s).

Each epoch is a seeded permutation of the pool; step s takes the s-th global batch of it and each
rank its contiguous slice. Resuming needs only the step number, and N ranks see exactly the global
batch one process would. Up to `LAZY_ABOVE` samples the permutation is numpy's, held for the epoch
(the lab's runs depend on its exact order); past that it is a keyed Feistel permutation evaluated
only at the positions of the step, so no rank holds an index list the size of the corpus.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

LAZY_ABOVE = 1 << 24
_ROUNDS = 4
_MASK64 = np.uint64((1 << 64) - 1)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A 64-bit hash of `x` under `key` (splitmix64's finaliser); arithmetic wraps modulo 2**64."""
    z = (x + key) & _MASK64
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return z ^ (z >> np.uint64(31))


class LazyPermutation:
    """A bijection of range(n) chosen by `seed`, computed at any positions without a table.

    A balanced Feistel network permutes the smallest even-bit power of two >= n; positions that land
    at or past n are mapped again until they fall inside (cycle walking), which keeps it a bijection
    of range(n). Expected passes: under 4, since the domain is less than 4n.
    """

    def __init__(self, n: int, seed: int | list[int]):
        self.n = n
        half_bits = max(1, -(-max(1, (n - 1).bit_length()) // 2))
        self._half = np.uint64(half_bits)
        self._low = np.uint64((1 << half_bits) - 1)
        keys = np.random.default_rng(seed).integers(0, 1 << 63, size=_ROUNDS, dtype=np.int64)
        self._keys = [np.uint64(k) for k in keys]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._low
        for key in self._keys:
            left, right = right, left ^ (_mix(right, key) & self._low)
        return (left << self._half) | right

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        out = self._feistel(np.asarray(positions, dtype=np.uint64))
        outside = out >= self.n
        while outside.any():
            out[outside] = self._feistel(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)


class StepSampler:
    """Rows of step `s` for one rank: the s-th global batch of the epoch's permutation of the pool."""

    def __init__(
        self,
        pool: np.ndarray,
        global_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        lazy_above: int = LAZY_ABOVE,
    ):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        if len(pool) < global_batch:
            raise ValueError(f"only {len(pool)} training samples for a global batch of {global_batch}")
        self.pool = np.asarray(pool, dtype=np.int64)
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed, self.rank = seed, rank
        self.steps_per_epoch = len(self.pool) // global_batch
        self.lazy = len(self.pool) > lazy_above
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray | LazyPermutation:
        if epoch != self._epoch:
            self._epoch = epoch
            if self.lazy:
                self._perm = LazyPermutation(len(self.pool), [self.seed, epoch])
            else:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.pool))
        return self._perm

    def indices(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch + self.rank * self.local_batch
        return self.pool[self._permutation(epoch)[np.arange(start, start + self.local_batch)]]

    def schedule(self, start: int, stop: int) -> Iterator[np.ndarray]:
        for step in range(start, stop):
            yield self.indices(step)
