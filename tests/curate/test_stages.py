"""The `balance` and `cluster` stages on a tiny real teacher cache."""

from __future__ import annotations

import numpy as np
import pytest

from cid_fixtures import build_tiny_cache, stage_config
from clipdistill.cache import TeacherCache
from clipdistill.curate.stages import CacheView, run_balance, run_cluster


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory)


def test_cache_view_reads_rows_lazily(tiny_cache):
    cache = TeacherCache(tiny_cache)
    view = CacheView(cache)
    assert view.shape == (256, cache.meta.image_dim) and len(view) == 256
    np.testing.assert_array_equal(view[3:7], cache.rows(np.arange(3, 7))[0].numpy())
    np.testing.assert_array_equal(view[np.array([9, 2])], cache.rows([9, 2])[0].numpy())
    assert view[0:2].dtype == np.float32


def test_balance_hits_keep_ratio_and_is_reused(tiny_cache, tmp_path):
    cfg = stage_config(tiny_cache, tmp_path / "run", "--balance.keep_ratio", "0.5")
    report = run_balance(cfg)
    folder = tmp_path / "run" / "balance"
    kept, random = np.load(folder / "kept.npy"), np.load(folder / "random.npy")
    assert kept.dtype == np.int64 and np.all(np.diff(kept) > 0)
    assert abs(len(kept) / 256 - 0.5) <= 0.01
    assert len(random) == len(kept) and len(np.unique(random)) == len(random)
    assert random.min() >= 0 and random.max() < 256 and not np.array_equal(random, kept)
    assert report["kept"] == len(kept) == 256 - report["removed_perceptual"] - report["removed_semantic"]
    assert (folder / "cluster_sizes.png").read_bytes()[:4] == b"\x89PNG"
    stamp = (folder / "kept.npy").stat().st_mtime_ns
    assert run_balance(cfg) == report
    assert (folder / "kept.npy").stat().st_mtime_ns == stamp


def test_keep_ratio_is_a_share_of_the_valid_samples(tiny_cache, tmp_path):
    """Skipped samples never train: a quarter of them skipped must not lower what keep_ratio keeps."""
    cfg = stage_config(tiny_cache, tmp_path / "run", "--balance.keep_ratio", "0.5")
    valid = np.ones(256, dtype=bool)
    valid[::4] = False
    np.save(tmp_path / "run" / "cache" / "valid.npy", valid)
    report = run_balance(cfg)
    kept = np.load(tmp_path / "run" / "balance" / "kept.npy")
    assert valid[kept].all() and report["valid_samples"] == 192
    assert abs(len(kept) / 192 - 0.5) <= 0.01 and report["kept_ratio"] == len(kept) / 192


def test_cluster_labels_cover_the_subset(tiny_cache, tmp_path):
    cfg = stage_config(tiny_cache, tmp_path / "run", "--balance.keep_ratio", "0.5")
    run_balance(cfg)
    report = run_cluster(cfg)
    folder = tmp_path / "run" / "cluster"
    centroids, labels = np.load(folder / "centroids.npy"), np.load(folder / "labels.npy")
    assert centroids.dtype == np.float32 and centroids.shape == (8, TeacherCache(tiny_cache).meta.image_dim)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    assert labels.dtype == np.int64 and labels.shape == (256,)
    assert labels.min() >= 0 and labels.max() < 8 and report["clustered_samples"] == 256

    cfg.cluster.subset = "balance/kept.npy"
    report = run_cluster(cfg)
    labels = np.load(folder / "labels.npy")
    kept = np.load(tmp_path / "run" / "balance" / "kept.npy")
    assert np.all(labels[kept] >= 0) and np.all(np.delete(labels, kept) == -1)
    assert report["clustered_samples"] == len(kept)


def test_cluster_writes_the_folder_cid_reads(tiny_cache, tmp_path):
    cfg = stage_config(tiny_cache, tmp_path / "run", "--cluster.n_clusters", "4", "--cid.clusters", "k4")
    assert run_cluster(cfg)["n_clusters"] == 4
    assert np.load(tmp_path / "run" / "k4" / "centroids.npy").shape[0] == 4
    assert not (tmp_path / "run" / "cluster").exists()
