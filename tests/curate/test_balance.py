"""Image semantic balance: perceptual and semantic dedup, keep-ratio search, report plot, pHash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from clipdistill.curate import balance
from clipdistill.curate.balance import (
    cluster_size_histogram_png,
    perceptual_dedup,
    perceptual_hash,
    search_tau_for_keep_ratio,
    semantic_dedup,
    semantic_thin,
)
from clipdistill.curate.cluster import normalize_rows


def _memmap(x: np.ndarray, path: Path) -> np.ndarray:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=x.shape)
    out[:] = x
    out.flush()
    return np.load(path, mmap_mode="r")


def _with_duplicates(seed: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    """60 distinct directions in 32-D (pairwise cosine < 0.8) plus copies: rows 60-64 repeat rows
    0-4 exactly, rows 65-69 are near copies (cosine ~0.995) of rows 10-14, and row 70 is a near
    copy of row 65, making the three-item group {10, 65, 70}."""
    rng = np.random.default_rng(seed)
    base = normalize_rows(rng.standard_normal((60, 32)))
    near = normalize_rows(base[10:15] + 0.1 / np.sqrt(32) * rng.standard_normal((5, 32)))
    chained = normalize_rows(near[:1] + 0.1 / np.sqrt(32) * rng.standard_normal((1, 32)))
    x = np.concatenate([base, base[:5], near, chained])
    groups = [[i, 60 + i] for i in range(5)] + [[10, 65, 70]] + [[10 + i, 65 + i] for i in range(1, 5)]
    return x, groups


def test_perceptual_dedup_keeps_the_first_of_each_group(tmp_path: Path) -> None:
    x, groups = _with_duplicates()
    perm = np.random.default_rng(1).permutation(len(x))  # duplicates may now precede originals
    inverse = np.argsort(perm)
    emb = _memmap(x[perm], tmp_path / "x.npy")
    keep = perceptual_dedup(emb, tau_p=0.98)
    for group in groups:
        rows = sorted(inverse[group].tolist())
        assert keep[rows].tolist() == [True] + [False] * (len(rows) - 1)
    assert keep.sum() == 60  # every distinct item kept
    np.testing.assert_array_equal(perceptual_dedup(emb, tau_p=0.98, chunk=9), keep)
    np.testing.assert_array_equal(perceptual_dedup(emb, tau_p=0.98, chunk=10**6), keep)
    # Exact copies only, at a strict threshold; rows masked out stay dropped and join no group.
    strict = perceptual_dedup(emb, tau_p=0.9999)
    assert strict.sum() == 71 - 5
    mask = np.ones(len(x), dtype=bool)
    mask[inverse[0]] = False
    masked = perceptual_dedup(emb, keep_mask=mask, tau_p=0.9999)
    assert not masked[inverse[0]] and masked[inverse[60]]


def test_perceptual_dedup_by_hash_hamming_distance() -> None:
    hashes = np.array([0b1011, 0xFFFF0000, 0b1011, 0b1000, 0xFFFF0003, 0x7 << 60], dtype=np.uint64)
    emb = np.eye(6, dtype=np.float32)  # all distinct by cosine
    assert perceptual_dedup(emb, hashes=hashes).tolist() == [True, True, False, True, True, True]
    within_2 = perceptual_dedup(emb, tau_p=None, hashes=hashes, max_hamming=2, chunk=4)
    assert within_2.tolist() == [True, True, False, False, False, True]


def _two_clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A dense cluster (200 rows, pairwise cosine ~0.92) and a sparse one (30 rows, pairwise
    cosine ~0.36), orthogonal to each other."""
    rng = np.random.default_rng(seed)
    a, b = np.eye(32, dtype=np.float32)[:2]
    dense = normalize_rows(a + 0.05 * rng.standard_normal((200, 32)))
    spread = rng.standard_normal((30, 32))
    spread[:, :2] = 0
    sparse = 0.6 * b + 0.8 * normalize_rows(spread)
    x = np.concatenate([dense, sparse])
    order = rng.permutation(len(x))
    return x[order], np.flatnonzero(order < 200), np.flatnonzero(order >= 200)


def test_semantic_dedup_thins_dense_cluster_and_keeps_sparse_one_whole() -> None:
    x, dense, sparse = _two_clusters()
    keep, cluster_of = semantic_dedup(x, np.ones(len(x), dtype=bool), n_clusters=2, tau_s=0.8)
    assert len(set(cluster_of[dense])) == 1 and len(set(cluster_of[sparse])) == 1
    assert cluster_of[dense[0]] != cluster_of[sparse[0]]
    assert keep[sparse].all()
    assert 1 <= keep[dense].sum() <= 10
    # Greedy in index order: the kept rows of a cluster are pairwise <= tau_s, and each dropped
    # row is within tau_s of a kept row that comes before it.
    kept_dense = dense[keep[dense]]
    sims = x[kept_dense] @ x[kept_dense].T
    assert (sims[~np.eye(len(kept_dense), dtype=bool)] <= 0.8).all()
    assert kept_dense[0] == dense.min()
    for row in dense[~keep[dense]]:
        earlier = kept_dense[kept_dense < row]
        assert (x[earlier] @ x[row] > 0.8).any()


def test_semantic_thin_blocks_match_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    x, _, _ = _two_clusters(seed=1)
    keep_mask = np.random.default_rng(0).random(len(x)) > 0.1
    cluster_of = (x[:, 1] > 0.5).astype(np.int64)
    whole = semantic_thin(x, keep_mask, cluster_of, tau_s=0.9)
    monkeypatch.setattr(balance, "_PAIR_BLOCK", 7)
    np.testing.assert_array_equal(semantic_thin(x, keep_mask, cluster_of, tau_s=0.9), whole)
    assert not (whole & ~keep_mask).any()


def _mixture(n: int = 5000, dim: int = 32, k: int = 25, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = normalize_rows(rng.standard_normal((k, dim)))
    spread = rng.uniform(0.1, 0.6, size=k)  # some clusters tight (redundant), some loose
    which = rng.integers(0, k, size=n)
    return normalize_rows(centers[which] + spread[which, None] * rng.standard_normal((n, dim)))


def test_keep_ratio_search_lands_within_tolerance(tmp_path: Path) -> None:
    emb = _memmap(_mixture(), tmp_path / "x.npy")
    everything = np.ones(len(emb), dtype=bool)
    _, cluster_of = semantic_dedup(emb, everything, n_clusters=25, tau_s=1.0, chunk=1000)
    for target in (0.4, 0.75):
        tau, keep = search_tau_for_keep_ratio(emb, everything, cluster_of, target, tol=0.01)
        assert abs(keep.mean() - target) <= 0.01
        np.testing.assert_array_equal(semantic_thin(emb, everything, cluster_of, tau), keep)
    half = np.arange(len(emb)) % 2 == 0
    with pytest.raises(ValueError, match=r"perceptual pass are 0.500 of the data; raise --balance.tau_p"):
        search_tau_for_keep_ratio(emb, half, cluster_of, 0.6)
    with pytest.raises(ValueError, match="one row per cluster"):
        search_tau_for_keep_ratio(emb, everything, cluster_of, 0.001, tol=0.0001)


def test_semantic_dedup_chunking_does_not_change_the_result() -> None:
    x = _mixture(n=1200, seed=1)
    mask = np.random.default_rng(2).random(len(x)) > 0.2
    small = semantic_dedup(x, mask, n_clusters=10, tau_s=0.7, chunk=97)
    large = semantic_dedup(x, mask, n_clusters=10, tau_s=0.7, chunk=10**6)
    np.testing.assert_array_equal(small[0], large[0])
    np.testing.assert_array_equal(small[1], large[1])


def test_cluster_size_histogram_png(tmp_path: Path) -> None:
    cluster_of = np.array([0, 0, 0, 0, 1, 1, 2, 3])
    before = np.ones(8, dtype=bool)
    after = np.array([1, 0, 0, 1, 1, 1, 1, 1], dtype=bool)
    path = tmp_path / "sizes.png"
    cluster_size_histogram_png(cluster_of, before, after, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(path).shape[:2] == (400, 600)


def test_perceptual_hash_groups_near_copies_of_an_image() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    smooth = (127 + 100 * np.sin(xx / 9.0) * np.cos(yy / 13.0)).astype(np.uint8)
    noisy = np.clip(smooth + rng.integers(-3, 4, smooth.shape), 0, 255).astype(np.uint8)
    other = (rng.random((64, 64)) * 255).astype(np.uint8)
    gray = perceptual_hash(np.stack([smooth, noisy, other]))
    assert gray.dtype == np.uint64 and gray.shape == (3,)

    def bits(a: np.uint64, b: np.uint64) -> int:
        return (int(a) ^ int(b)).bit_count()

    assert bits(gray[0], gray[1]) <= 4 < 16 <= bits(gray[0], gray[2])
    rgb = perceptual_hash(np.repeat(np.stack([smooth])[..., None], 3, axis=-1))
    assert rgb[0] == gray[0] == perceptual_hash(smooth[None, ..., None])[0]
