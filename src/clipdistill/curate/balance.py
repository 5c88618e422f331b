"""Image semantic balance (CLIP-CID, docs/methods.md): drop perceptual, then semantic, redundancy.

Inputs are L2-normalised teacher image embeddings [N, D], possibly memory-mapped float16. They
are never read whole: rows stream in chunks, and memory stays O(chunk·D + N ints).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import imagehash
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from clipdistill.curate.cluster import CHUNK, kmeans_centroids, normalize_rows

Pairs = tuple[np.ndarray, np.ndarray]
# Side of the blocks of pairwise similarities held in memory while thinning a cluster.
_PAIR_BLOCK = 4096


def _find(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Roots of `x` in the union-find forest, compressing the paths walked."""
    root = parent[x]
    while not np.array_equal(up := parent[root], root):
        root = up
    parent[x] = root
    return root


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Merge the groups of every pair (a_i, b_i). A root only ever points to a lower index, so
    each group's root is its first member; conflicting merges are settled over a few rounds."""
    while a.size:
        root_a, root_b = _find(parent, a), _find(parent, b)
        differ = root_a != root_b
        a, b, root_a, root_b = a[differ], b[differ], root_a[differ], root_b[differ]
        np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))


def _pairs(lims: np.ndarray, found: np.ndarray, query_rows: np.ndarray, db_rows: np.ndarray) -> Pairs:
    """(later, earlier) row pairs from a faiss range search; each pair is reported once."""
    later = np.repeat(query_rows, np.diff(lims).astype(np.int64))
    earlier = db_rows[found]
    ahead = earlier < later
    return later[ahead], earlier[ahead]


def _cosine_pairs(embeddings: Any, valid: np.ndarray, tau: float, chunk: int) -> Iterator[Pairs]:
    """Pairs of valid rows with cosine >= tau: every chunk against itself and every earlier chunk."""
    radius = float(np.nextafter(np.float32(tau), np.float32(-np.inf)))  # faiss keeps IP > radius
    for start in range(0, len(valid), chunk):
        rows = start + np.flatnonzero(valid[start : start + chunk])
        queries = normalize_rows(embeddings[rows])
        for db_start in range(0, start + 1, chunk):
            db_rows = db_start + np.flatnonzero(valid[db_start : db_start + chunk])
            index = faiss.IndexFlatIP(queries.shape[1])
            index.add(queries if db_start == start else normalize_rows(embeddings[db_rows]))
            lims, _, found = index.range_search(queries, radius)
            yield _pairs(lims, found, rows, db_rows)


def _hamming_pairs(hashes: np.ndarray, valid: np.ndarray, max_hamming: int, chunk: int) -> Iterator[Pairs]:
    """Pairs of valid rows whose 64-bit hashes differ in at most `max_hamming` bits."""
    rows = np.flatnonzero(valid)
    codes = np.ascontiguousarray(hashes[rows], dtype=np.uint64).view(np.uint8).reshape(-1, 8)
    index = faiss.IndexBinaryFlat(64)
    index.add(codes)
    for start in range(0, len(rows), chunk):
        lims, _, found = index.range_search(codes[start : start + chunk], max_hamming + 1)  # d < radius
        yield _pairs(lims, found, rows[start : start + chunk], rows)


def perceptual_dedup(
    embeddings: Any,
    keep_mask: np.ndarray | None = None,
    tau_p: float | None = 0.98,
    hashes: np.ndarray | None = None,
    max_hamming: int = 0,
    chunk: int = CHUNK,
) -> np.ndarray:
    """Keep-mask with one item per group of near-identical items: the first (lowest index).

    Two rows are near-identical when their cosine is >= `tau_p` (exact search, chunk against
    chunk: O(N²·D) time, fine to a few million rows) or, given `hashes` (uint64 perceptual hashes),
    when those differ in at most `max_hamming` bits; `tau_p=None` uses the hashes only. Groups are
    the connected components of that relation. Rows where `keep_mask` is false are ignored and
    stay dropped.
    """
    n = len(embeddings)
    valid = np.ones(n, dtype=bool) if keep_mask is None else np.asarray(keep_mask, dtype=bool)
    parent = np.arange(n)
    found = []
    if tau_p is not None:
        found.append(_cosine_pairs(embeddings, valid, tau_p, chunk))
    if hashes is not None:
        found.append(_hamming_pairs(hashes, valid, max_hamming, chunk))
    for pairs in found:
        for later, earlier in pairs:
            _union(parent, later, earlier)
    return valid & (_find(parent, np.arange(n)) == np.arange(n))


def _thin_cluster(embeddings: Any, members: np.ndarray, tau: float) -> np.ndarray:
    """Walk `members` (in index order) and keep one unless its cosine to an already-kept member
    exceeds `tau`: kept members are then pairwise <= tau apart and cover the dropped ones."""
    keep = np.zeros(len(members), dtype=bool)
    for start in range(0, len(members), _PAIR_BLOCK):
        x = normalize_rows(embeddings[members[start : start + _PAIR_BLOCK]])
        dropped = np.zeros(len(x), dtype=bool)
        for kept_start in range(0, start, _PAIR_BLOCK):
            kept = members[kept_start : kept_start + _PAIR_BLOCK][keep[kept_start : kept_start + _PAIR_BLOCK]]
            if kept.size:
                dropped |= (x @ normalize_rows(embeddings[kept]).T > tau).any(axis=1)
        near = x @ x.T > tau
        for i in range(len(x)):
            if not dropped[i]:
                keep[start + i] = True
                dropped[i + 1 :] |= near[i, i + 1 :]
    return keep


def semantic_thin(embeddings: Any, keep_mask: np.ndarray, cluster_of: np.ndarray, tau_s: float) -> np.ndarray:
    """Keep-mask after thinning every cluster with `tau_s` (see `semantic_dedup`)."""
    rows = np.flatnonzero(keep_mask)
    by_cluster = rows[np.argsort(cluster_of[rows], kind="stable")]  # index order inside a cluster
    bounds = np.flatnonzero(np.diff(cluster_of[by_cluster])) + 1
    keep = np.zeros(len(keep_mask), dtype=bool)
    for members in np.split(by_cluster, bounds):
        keep[members[_thin_cluster(embeddings, members, tau_s)]] = True
    return keep


def semantic_dedup(
    embeddings: Any,
    keep_mask: np.ndarray,
    n_clusters: int,
    tau_s: float,
    seed: int = 0,
    chunk: int = CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """SemDeDup-style thinning: (keep-mask, cluster of every row).

    k-means on the rows kept so far; inside each cluster a member is dropped when its cosine to an
    already-kept member of the same cluster exceeds `tau_s`, so dense clusters are thinned and
    sparse ones kept whole. Every row, kept or not, gets a cluster (for the before/after view).
    """
    _, cluster_of = kmeans_centroids(embeddings, n_clusters, seed=seed, chunk=chunk, mask=keep_mask)
    return semantic_thin(embeddings, keep_mask, cluster_of, tau_s), cluster_of


def search_tau_for_keep_ratio(
    embeddings: Any,
    keep_mask: np.ndarray,
    cluster_of: np.ndarray,
    target_ratio: float,
    tol: float = 0.01,
    max_steps: int = 30,
    total: int | None = None,
) -> tuple[float, np.ndarray]:
    """Bisect `tau_s` until the kept fraction of `total` rows (the valid ones; default all N) is within
    `tol` of `target_ratio`.

    Reuses `cluster_of`. Raises ValueError when the target is out of reach: above what the
    perceptual pass left, or below one row per cluster.
    """
    n = len(keep_mask) if total is None else total

    def ratio_at(tau: float) -> tuple[float, np.ndarray]:
        keep = semantic_thin(embeddings, keep_mask, cluster_of, tau)
        return keep.sum() / n, keep

    lo, hi = -1.0, 1.0
    most, keep = ratio_at(hi)
    if most < target_ratio - tol:
        raise ValueError(
            f"keep ratio {target_ratio:.3f} unreachable: the valid samples left by the perceptual pass are "
            f"{most:.3f} of the data; raise --balance.tau_p (near-duplicates are closer than it) or lower "
            "--balance.keep_ratio"
        )
    if abs(most - target_ratio) <= tol:
        return hi, keep
    fewest, keep = ratio_at(lo)
    if fewest > target_ratio + tol:
        raise ValueError(
            f"keep ratio {target_ratio:.3f} unreachable: one row per cluster is already {fewest:.3f}; "
            "use fewer clusters (--balance.n_clusters)"
        )
    for _ in range(max_steps):
        tau = (lo + hi) / 2
        ratio, keep = ratio_at(tau)
        if abs(ratio - target_ratio) <= tol:
            return tau, keep
        lo, hi = (lo, tau) if ratio > target_ratio else (tau, hi)
    raise ValueError(f"no tau_s within {tol} of keep ratio {target_ratio:.3f}; last {ratio:.3f} at {tau:.6f}")


def cluster_size_histogram_png(
    cluster_of: np.ndarray, keep_before: np.ndarray, keep_after: np.ndarray, path: str | Path
) -> None:
    """Cluster sizes before and after balancing, each sorted largest first, on a log scale: the
    paper's Figure 2(d) view, where balancing flattens the head and leaves the tail."""
    n_clusters = int(cluster_of.max()) + 1
    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.add_subplot()
    for name, mask in (("before", keep_before), ("after", keep_after)):
        sizes = np.sort(np.bincount(cluster_of[mask], minlength=n_clusters))[::-1]
        ax.plot(np.arange(1, n_clusters + 1), sizes, label=f"{name} ({int(mask.sum()):,} samples)")
    ax.set_yscale("log")
    ax.set_xlabel("cluster rank (largest first)")
    ax.set_ylabel("samples in cluster")
    ax.legend()
    fig.savefig(path, format="png", dpi=100)


def perceptual_hash(images: np.ndarray) -> np.ndarray:
    """64-bit pHash (ImageHash's DCT hash) of each uint8 image [N, H, W] or [N, H, W, C]."""
    hashes = np.empty(len(images), dtype=np.uint64)
    for i, image in enumerate(images):
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        hashes[i] = int(str(imagehash.phash(Image.fromarray(np.asarray(image, dtype=np.uint8)))), 16)
    return hashes
