"""Time and peak memory of `cluster` (faiss k-means) and the semantic pass of `balance` at scale.

    .venv/bin/python benchmarks/cluster_scale.py --n 1000000 --dim 256 --k 10000

The embeddings are a float16 memory-mapped file of unit vectors drawn around 2,000 random
centres (a corpus has structure; pure noise makes k-means and dedup meaningless), written once
to --workdir. Prints one JSON line per measured step.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

from clipdistill.curate.balance import semantic_thin
from clipdistill.curate.cluster import kmeans_centroids


def make_embeddings(path: Path, n: int, dim: int, seed: int = 0, chunk: int = 100_000) -> np.memmap:
    if path.is_file():
        return np.load(path, mmap_mode="r")
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, dim)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        x = centres[rng.integers(0, len(centres), rows)] + 0.3 * rng.standard_normal(
            (rows, dim), dtype=np.float32
        )
        out[start : start + rows] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    return np.load(path, mmap_mode="r")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=10_000)
    parser.add_argument("--niter", type=int, default=10)
    parser.add_argument("--points-per-centroid", type=int, default=32)
    parser.add_argument("--tau-s", type=float, default=0.9)
    parser.add_argument("--workdir", default="runs/scale")
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)

    start = time.time()
    emb = make_embeddings(Path(args.workdir) / f"emb_{args.n}x{args.dim}.npy", args.n, args.dim)
    print(json.dumps({"step": "data", "seconds": round(time.time() - start, 1), "shape": list(emb.shape)}))

    start = time.time()
    centroids, labels = kmeans_centroids(
        emb, args.k, niter=args.niter, max_points_per_centroid=args.points_per_centroid
    )
    print(json.dumps({
        "step": "cluster (k-means train on a sample + chunked assignment)", "k": args.k,
        "trained_on": min(args.n, args.k * args.points_per_centroid), "niter": args.niter,
        "seconds": round(time.time() - start, 1), "peak_rss_gib": round(peak_rss_gib(), 2),
    }))  # fmt: skip

    start = time.time()
    keep = semantic_thin(emb, np.ones(len(emb), dtype=bool), labels, args.tau_s)
    print(json.dumps({
        "step": "balance semantic pass (within-cluster dedup)", "tau_s": args.tau_s,
        "kept_ratio": round(float(keep.mean()), 4), "seconds": round(time.time() - start, 1),
        "peak_rss_gib": round(peak_rss_gib(), 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
