"""Spherical k-means: blob recovery, unit centroids, determinism, chunked == one-shot assignment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipdistill.curate.cluster import assign_labels, concat_image_text, kmeans_centroids, normalize_rows


def _blobs(n_per: int = 150, k: int = 6, dim: int = 16, noise: float = 0.05, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = np.linalg.qr(rng.standard_normal((dim, k)))[0].T  # orthonormal: far apart
    truth = rng.permutation(np.repeat(np.arange(k), n_per))
    x = normalize_rows(centers[truth] + noise * rng.standard_normal((len(truth), dim)))
    return x, truth


def _memmap(x: np.ndarray, path: Path) -> np.ndarray:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=x.shape)
    out[:] = x
    out.flush()
    return np.load(path, mmap_mode="r")


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to a renaming of the labels: the pairs (a_i, b_i) form a bijection."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_recovers_separated_blobs_from_a_float16_memmap(tmp_path: Path) -> None:
    x, truth = _blobs()
    # Lloyd's iterations keep a bad seeding (two seeds in one blob) for some seeds; seed 0 is not
    # one of them here, and determinism keeps it that way.
    centroids, labels = kmeans_centroids(_memmap(x, tmp_path / "x.npy"), 6, seed=0, chunk=100)
    assert centroids.shape == (6, 16) and centroids.dtype == np.float32 and labels.dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-5)
    assert _same_partition(labels, truth)
    for c in range(6):  # each centroid sits on its blob's mean direction
        mean = normalize_rows(x[labels == c].mean(axis=0, keepdims=True))[0]
        assert centroids[c] @ mean > 0.999


def test_same_seed_same_output_and_mask_limits_training() -> None:
    x, _ = _blobs(n_per=100, k=8, noise=0.3, seed=1)
    first = kmeans_centroids(x, 8, seed=3)
    second = kmeans_centroids(x, 8, seed=3)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], kmeans_centroids(x, 8, seed=4)[0])
    with pytest.raises(ValueError, match="cannot make"):
        kmeans_centroids(x, 8, mask=np.arange(len(x)) < 5)


def test_chunked_assignment_equals_one_shot_and_ivf_agrees_on_blobs() -> None:
    x, truth = _blobs(k=12, n_per=80, seed=2)
    centroids, labels = kmeans_centroids(x, 12)
    one_shot = np.argmax(x @ centroids.T, axis=1)
    np.testing.assert_array_equal(labels, one_shot)
    np.testing.assert_array_equal(assign_labels(x, centroids, chunk=7), one_shot)
    np.testing.assert_array_equal(assign_labels(x, centroids, chunk=len(x)), one_shot)
    np.testing.assert_array_equal(assign_labels(x, centroids, index="ivf"), one_shot)
    with pytest.raises(ValueError, match="index"):
        assign_labels(x, centroids, index="hnsw")


def test_concat_image_text_is_lazy_unit_and_clusterable() -> None:
    image, truth = _blobs(dim=8, seed=3)
    rng = np.random.default_rng(4)
    text = 3.0 * rng.standard_normal((len(image), 4))  # unnormalised: the view normalises each half
    both = concat_image_text(image, text)
    assert both.shape == (len(image), 12) and len(both) == len(image)
    rows = both[np.array([0, 5])]
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(rows[:, :8] * np.sqrt(2), image[[0, 5]], rtol=1e-5)
    np.testing.assert_allclose(both[2:4], both[np.array([2, 3])])
    _, labels = kmeans_centroids(both, 6, seed=0, chunk=50)
    assert _same_partition(labels, truth)  # text is noise here; the image blobs still dominate
    with pytest.raises(ValueError, match="rows"):
        concat_image_text(image, text[:-1])
