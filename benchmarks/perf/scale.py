"""Item 5: `cluster` (k-means) and `balance` (semantic pass) on 1M x 256 embeddings, measured by
benchmarks/cluster_scale.py in its own process (so its peak memory is its own), and the arithmetic
that projects them to the paper's 225M samples and 1M clusters on 8 GPUs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from benchmarks.perf.timing import run_with_peak_memory

SCRIPT = Path(__file__).resolve().parents[1] / "cluster_scale.py"

# Projection assumptions, written out so the arithmetic can be checked.
PAPER_SAMPLES, PAPER_K, DIM, GPUS = 225_000_000, 1_000_000, 256, 8
POINTS_PER_CENTROID, NITER = 64, 20  # curate/cluster.py's sampling at large K
GPU_FLOPS = 4e14  # one H100: ~0.4 PFLOP/s effective on large fp16/tf32 GEMMs (about 40-80% of peak)
IVF_LISTS, IVF_PROBE = 4000, 32  # assign_labels(index="ivf"): ~4 sqrt(K) lists


def scale_command(n: int, dim: int, k: int, workdir: str) -> list[str]:
    return [
        sys.executable,
        str(SCRIPT),
        "--n",
        str(n),
        "--dim",
        str(dim),
        "--k",
        str(k),
        "--workdir",
        workdir,
    ]


def measure(n: int, dim: int, k: int, workdir: str, threads: int) -> dict:
    """The script's JSON lines by step (cluster, balance), and its whole process's peak memory and CPU
    seconds. The embeddings are written first, outside the measured process."""
    from benchmarks.cluster_scale import make_embeddings

    Path(workdir).mkdir(parents=True, exist_ok=True)
    make_embeddings(Path(workdir) / f"emb_{n}x{dim}.npy", n, dim)
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    run = run_with_peak_memory(scale_command(n, dim, k, workdir), env)
    steps = [json.loads(line) for line in run["stdout"].splitlines() if line.startswith("{")]
    for step in steps:
        step.pop(
            "peak_rss_gib", None
        )  # ru_maxrss, inflated by the parent's size at fork: see run_with_peak_memory
    process = {"peak_rss_gib": round(run["peak_rss_mib"] / 1024, 2), "cpu_s": round(run["cpu_s"], 1)}
    return {"cluster": steps[1], "balance": steps[2], "process": process, "threads": threads}


def projection(
    measured: dict, n: int, dim: int, k: int, points_per_centroid: int = 32, niter: int = 10
) -> dict:
    """FLOP counts of the measured run and of the paper's scale, with the resulting estimates."""
    trained_on = min(n, k * points_per_centroid)
    cpu_flop = 2 * dim * k * (trained_on * niter + n)  # Lloyd iterations on the sample + assigning all rows
    cpu_rate = cpu_flop / measured["cluster"]["seconds"]
    sample = PAPER_K * POINTS_PER_CENTROID
    train_flop = 2 * DIM * PAPER_K * sample * NITER
    assign_flop = 2 * DIM * PAPER_SAMPLES * (IVF_LISTS + PAPER_K * IVF_PROBE / IVF_LISTS)
    # The semantic pass compares each row with its cluster's members: cost ~ rows x cluster size.
    balance_scale = (PAPER_SAMPLES * PAPER_SAMPLES / PAPER_K) / (n * n / k)
    return {
        "measured_cpu_flop": cpu_flop,
        "measured_cpu_gflops": round(cpu_rate / 1e9, 1),  # per wall second: the load of the machine lowers it
        "measured_gflops_per_cpu_second": round(
            cpu_flop / measured.get("process", {}).get("cpu_s", 0) / 1e9, 1
        )
        if measured.get("process", {}).get("cpu_s")
        else None,
        "kmeans_train_flop": f"2 x {DIM} x {PAPER_K:.0e} clusters x {sample:.1e} sample x {NITER} iter"
        f" = {train_flop:.2e}",
        "kmeans_train_s_8gpu": round(train_flop / (GPUS * GPU_FLOPS), 1),
        "assign_flop": f"2 x {DIM} x {PAPER_SAMPLES:.2e} x ({IVF_LISTS} lists + {PAPER_K:.0e} x "
        f"{IVF_PROBE}/{IVF_LISTS}) = {assign_flop:.2e}",
        "assign_s_8gpu": round(assign_flop / (GPUS * GPU_FLOPS), 2),
        "sample_gib_per_gpu_fp16": round(sample * DIM * 2 / GPUS / 2**30, 2),
        "centroids_gib_per_gpu_fp32": round(PAPER_K * DIM * 4 / 2**30, 2),
        "embeddings_gib_fp16": round(PAPER_SAMPLES * DIM * 2 / 2**30, 1),
        "balance_cost_factor": f"(225M x 225 per cluster) / ({n:.0e} x {n // k} per cluster)"
        f" = {balance_scale:.0f}",
        "balance_s_cpu_here": round(measured["balance"]["seconds"] * balance_scale),
    }
