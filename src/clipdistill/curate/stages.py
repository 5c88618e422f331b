"""The `balance` and `cluster` stages: curation over the teacher cache, written next to it.

Both read the run's cache (`<run_dir>/cache`, or `cache_<domain>` for `data.domain`) through
memory-mapped views (never the whole matrix), write their outputs atomically with `report.json` last,
and are skipped when that report carries the same settings fingerprint, so rerunning a pipeline only
redoes what changed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipdistill.cache import TeacherCache
from clipdistill.checkpoint import atomic_write, read_json, save_npy, write_json
from clipdistill.config import ConfigError, RunConfig, fingerprint, to_dict
from clipdistill.curate.balance import (
    cluster_size_histogram_png,
    perceptual_dedup,
    search_tau_for_keep_ratio,
    semantic_dedup,
)
from clipdistill.curate.cluster import concat_image_text, kmeans_centroids
from clipdistill.distributed import init_distributed
from clipdistill.runs import cache_dir, exclusive, model_dir, run_path, sweep_temps


class CacheView:
    """One half (image or text) of the cache's embeddings as a lazy array: rows are read from
    the memory-mapped shards on indexing, so curation never holds the whole cache."""

    def __init__(self, cache: TeacherCache, part: str = "image") -> None:
        self.cache, self.part = cache, part
        dim = cache.meta.image_dim if part == "image" else cache.meta.text_dim
        self.shape = (len(cache), dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(len(self)))
        image, text = self.cache.rows(np.asarray(rows, dtype=np.int64))
        return (image if self.part == "image" else text).numpy()


def _cache(cfg: RunConfig) -> TeacherCache:
    """The run's cache for `data.domain`; one without a valid sample is refused (nothing to curate)."""
    cache = TeacherCache(cache_dir(cfg))
    if not cache.valid.any():
        raise ValueError(
            f"the teacher cache at {cache.folder} has no valid sample ({len(cache)} skipped): "
            f"see {cache.folder / 'report.json'}, fix the data, delete {cache.folder} and rerun "
            "`clipdistill embed`"
        )
    return cache


def _reusable(folder: Path, key: str) -> dict | None:
    """The stored report when the stage already ran with these settings."""
    report = folder / "report.json"
    if report.is_file() and read_json(report).get("fingerprint") == key:
        return read_json(report)
    return None


def run_balance(cfg: RunConfig) -> dict:
    """Perceptual then semantic dedup of the cache's image embeddings -> `<run_dir>/balance/`."""
    bc = cfg.balance
    folder = model_dir(cfg, "balance")
    with exclusive(folder):
        cache = _cache(cfg)
        sweep_temps(folder)
        key = fingerprint({"balance": to_dict(bc), "cache": cache.meta.fingerprint})
        if (done := _reusable(folder, key)) is not None:
            return done
        images = CacheView(cache)
        valid = cache.valid.copy()
        after_perceptual = perceptual_dedup(images, keep_mask=valid, tau_p=bc.tau_p)
        if after_perceptual.sum() < bc.n_clusters:
            raise ValueError(
                f"the perceptual pass (tau_p {bc.tau_p}) left {int(after_perceptual.sum())} samples, "
                f"fewer than balance.n_clusters {bc.n_clusters}: raise --balance.tau_p or lower "
                "--balance.n_clusters"
            )
        kept_mask, cluster_of = semantic_dedup(
            images, after_perceptual, bc.n_clusters, bc.tau_s, seed=bc.seed
        )
        tau = bc.tau_s
        if bc.keep_ratio > 0:
            tau, kept_mask = search_tau_for_keep_ratio(
                images, after_perceptual, cluster_of, bc.keep_ratio, total=int(valid.sum())
            )
        kept = np.flatnonzero(kept_mask).astype(np.int64)
        rng = np.random.default_rng(bc.seed)
        random = np.sort(rng.choice(np.flatnonzero(valid), size=len(kept), replace=False)).astype(np.int64)
        save_npy(folder / "kept.npy", kept)
        save_npy(folder / "random.npy", random)
        atomic_write(
            folder / "cluster_sizes.png",
            lambda tmp: cluster_size_histogram_png(cluster_of, valid, kept_mask, tmp),
        )
        report = {
            "fingerprint": key,
            "num_samples": len(cache),
            "valid_samples": int(valid.sum()),
            "removed_perceptual": int(valid.sum() - after_perceptual.sum()),
            "removed_semantic": int(after_perceptual.sum() - kept_mask.sum()),
            "kept": len(kept),
            "kept_ratio": len(kept) / int(valid.sum()),  # of the valid samples, as balance.keep_ratio
            "tau_s": float(tau),
        }
        write_json(folder / "report.json", report)
        return report


def _subset_mask(cfg: RunConfig, cache: TeacherCache) -> tuple[np.ndarray, str]:
    """Rows to cluster (valid, within the optional kept-ids file) and a hash of that file."""
    mask = cache.valid.copy()
    if not cfg.cluster.subset:
        return mask, ""
    path = run_path(cfg, cfg.cluster.subset)
    if not path.is_file():
        raise ConfigError(f"cluster.subset {path} does not exist (run `clipdistill balance` first)")
    ids = np.load(path, allow_pickle=False)
    return mask & np.isin(np.arange(len(cache)), ids), hashlib.sha256(ids.tobytes()).hexdigest()[:16]


def run_cluster(cfg: RunConfig) -> dict:
    """Spherical k-means over the cache -> centroids.npy and labels.npy in `<run_dir>/<cid.clusters>/`,
    the folder `train.method cid` reads (so several clusterings can sit side by side). Under torchrun
    the ranks share the labelling pass and rank 0 writes."""
    is_main = init_distributed(torch.device("cpu")).is_main
    cc = cfg.cluster
    folder = model_dir(cfg, cfg.cid.clusters)
    with exclusive(folder):
        cache = _cache(cfg)
        sweep_temps(folder)
        mask, subset_hash = _subset_mask(cfg, cache)
        key = fingerprint({"cluster": to_dict(cc), "cache": cache.meta.fingerprint, "subset": subset_hash})
        if (done := _reusable(folder, key)) is not None:
            return done
        embeddings: Any = CacheView(cache)
        if cc.use_text:
            embeddings = concat_image_text(embeddings, CacheView(cache, "text"))
        centroids, labels = kmeans_centroids(
            embeddings, cc.n_clusters, seed=cc.seed, niter=cc.niter, mask=mask
        )
        labels = np.where(mask, labels, -1).astype(np.int64)
        if is_main:
            save_npy(folder / "centroids.npy", centroids.astype(np.float32))
            save_npy(folder / "labels.npy", labels)
        sizes = np.bincount(labels[mask], minlength=cc.n_clusters)
        report = {
            "fingerprint": key,
            "n_clusters": cc.n_clusters,
            "clustered_samples": int(mask.sum()),
            "dim": int(centroids.shape[1]),
            "largest_cluster": int(sizes.max()),
            "empty_clusters": int((sizes == 0).sum()),
        }
        if is_main:
            write_json(folder / "report.json", report)
        return report
