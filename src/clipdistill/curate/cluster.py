"""Spherical k-means over teacher embeddings: the centroids and labels of cluster discrimination.

Embeddings may be memory-mapped float16 arrays (or `concat_image_text` views) far larger than
memory: k-means trains on a random sample and labels are assigned a chunk of rows at a time.
Under torchrun, k-means trains in rank 0 only and every rank labels its own share of the chunks.
For K = 1,000,000 (the paper's scale): train on ~64-256 points per centroid on GPU with random
seeding, and assign labels through an IVF index over the centroids (`assign_labels(index="ivf")`).
"""

from __future__ import annotations

from typing import Any, Literal

import faiss
import numpy as np

from clipdistill import distributed

CHUNK = 65536
# AFK-MC² seeding (a cheap k-means++) costs O(K²·d); past this K it outweighs random seeding's
# weaker start, and with many clusters Lloyd's iterations recover from a random one anyway.
_MAX_CLUSTERS_SMART_SEEDING = 4096
_MIN_CLUSTERS_IVF = 100_000
_IVF_NPROBE = 32


def normalize_rows(x: Any) -> np.ndarray:
    """float32 copy of `x` with unit rows (zero rows stay zero)."""
    x = np.array(x, dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


class ConcatEmbeddings:
    """Image and text embeddings side by side, read lazily: row i is `[img_i, txt_i] / √2` with
    both halves unit-normalised, so the concatenation is unit norm and weighs both equally."""

    def __init__(self, image: Any, text: Any) -> None:
        if len(image) != len(text):
            raise ValueError(f"{len(image)} image rows but {len(text)} text rows")
        self.image, self.text = image, text
        self.shape = (len(image), image.shape[1] + text.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        halves = [normalize_rows(self.image[rows]), normalize_rows(self.text[rows])]
        return np.concatenate(halves, axis=1) / np.float32(np.sqrt(2.0))


def concat_image_text(image_emb: Any, text_emb: Any) -> ConcatEmbeddings:
    """The `image+text` clustering input, without materialising it."""
    return ConcatEmbeddings(image_emb, text_emb)


def _gpu(use_gpu: bool | None) -> bool:
    return faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu


def assign_labels(
    embeddings: Any,
    centroids: np.ndarray,
    chunk: int = CHUNK,
    index: Literal["auto", "flat", "ivf"] = "auto",
    use_gpu: bool | None = None,
) -> np.ndarray:
    """Nearest centroid (inner product) of every row, `chunk` rows at a time; under torchrun rank r
    labels chunks r, r + N, ... and every rank gets all labels (the same as one process's).

    "flat" is exact; "ivf" (the default from 100k centroids) probes 32 of ~4·√K centroid lists,
    approximate but sublinear in K.
    """
    k, d = centroids.shape
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    if index == "auto":
        index = "ivf" if k >= _MIN_CLUSTERS_IVF else "flat"
    if index == "flat":
        searcher = faiss.IndexFlatIP(d)
    elif index == "ivf":
        nlist = max(1, min(int(4 * np.sqrt(k)), k // 39))  # faiss wants >= 39 training points per list
        searcher = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        searcher.train(centroids)
        searcher.nprobe = min(nlist, _IVF_NPROBE)
    else:
        raise ValueError(f"index must be 'auto', 'flat' or 'ivf', got {index!r}")
    if _gpu(use_gpu):
        searcher = faiss.index_cpu_to_all_gpus(searcher)
    searcher.add(centroids)
    labels = np.zeros(len(embeddings), dtype=np.int64)
    for start in range(distributed.rank() * chunk, len(embeddings), distributed.world_size() * chunk):
        _, nearest = searcher.search(normalize_rows(embeddings[start : start + chunk]), 1)
        labels[start : start + chunk] = nearest[:, 0]
    return distributed.sum_disjoint_(labels)


def kmeans_centroids(
    embeddings: Any,
    n_clusters: int,
    seed: int = 0,
    niter: int = 20,
    max_points_per_centroid: int = 256,
    use_gpu: bool | None = None,
    chunk: int = CHUNK,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means: (unit centroids float32 [K, D], labels int64 [N]).

    Trains on at most `n_clusters * max_points_per_centroid` random rows (only rows where `mask`
    is true, when given), then labels every row. The same seed gives the same output.
    """
    n, d = embeddings.shape
    candidates = np.arange(n) if mask is None else np.flatnonzero(mask)
    if len(candidates) < n_clusters:
        raise ValueError(f"{len(candidates)} rows cannot make {n_clusters} clusters")
    rng = np.random.default_rng(seed)
    n_train = min(len(candidates), n_clusters * max_points_per_centroid)
    sample = np.sort(rng.choice(candidates, size=n_train, replace=False))
    init = (
        faiss.ClusteringInitMethod_AFK_MC2
        if n_clusters <= _MAX_CLUSTERS_SMART_SEEDING
        else faiss.ClusteringInitMethod_RANDOM
    )
    gpu = _gpu(use_gpu)
    kmeans = faiss.Kmeans(
        d,
        n_clusters,
        niter=niter,
        seed=seed,
        spherical=True,
        init_method=init,
        max_points_per_centroid=max_points_per_centroid,
        gpu=gpu,
    )
    centroids = None
    if distributed.rank() == 0:
        kmeans.train(normalize_rows(embeddings[sample]))
        centroids = normalize_rows(kmeans.centroids)
    centroids = distributed.broadcast_array(centroids)
    return centroids, assign_labels(embeddings, centroids, chunk=chunk, use_gpu=gpu)
