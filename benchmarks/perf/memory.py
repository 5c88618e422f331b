"""Item 4: peak memory of `train` when the teacher cache holds 10x more rows (memory-mapping works).

Both runs train the same data, method (`fd`) and steps; only the cache differs: N rows, or 10N rows
(the first N the same). A cache read whole would add its size to the process; a memory-mapped one
adds only the pages the batches touch. Widths are a ViT-L/14 teacher's (768 + 768), so the 10x
cache is large next to the process itself.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
from benchmarks.perf.fixtures import Setting, lab_overrides
from benchmarks.perf.timing import run_with_peak_memory

from clipdistill.cache import CacheMeta
from clipdistill.lab import LAB_CONFIG
from clipdistill.runs import data_id

WIDTH = 768


def write_cache(folder: Path, rows: int, cfg_data_id: str, shard_size: int = 8192, seed: int = 0) -> None:
    """A cache of unit rows in the layout `embed` writes (meta, fp16 shards, done marks)."""
    meta = CacheMeta("synthetic", "synthetic", cfg_data_id, rows, WIDTH, WIDTH, shard_size)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").write_text(json.dumps(meta.__dict__))
    rng = np.random.default_rng(seed)
    for s in range(meta.num_shards):
        n = len(meta.shard_rows(s))
        x = rng.standard_normal((n, 2 * WIDTH), dtype=np.float32)
        x[:, :WIDTH] /= np.linalg.norm(x[:, :WIDTH], axis=1, keepdims=True)
        x[:, WIDTH:] /= np.linalg.norm(x[:, WIDTH:], axis=1, keepdims=True)
        np.save(folder / f"emb_{s:05d}.npy", x.astype(np.float16))
        ids = [str(r) for r in meta.shard_rows(s)]
        (folder / f"shard_{s:05d}.json").write_text(
            json.dumps({"ids": ids, "valid": [True] * n, "skipped": []})
        )


def train_command(run_dir: Path, setting: Setting, steps: int) -> list[str]:
    args = lab_overrides(run_dir, setting, "--train.method", "fd", "--train.steps", str(steps),
                         "--train.name", "perf_memory", "--train.resume", "never")  # fmt: skip
    return [sys.executable, "-m", "clipdistill.cli", "train", "--config", str(LAB_CONFIG), *args]


def memory_peaks(workdir: Path, setting: Setting, steps: int, repeats: int) -> dict:
    """Peak RSS and peak anonymous memory (MiB, medians) of `train` with the small and the 10x cache."""
    from benchmarks.perf.fixtures import lab_config

    runs = {}
    for name, factor in (("cache_1x", 1), ("cache_10x", 10)):
        run_dir = workdir / name
        cfg = lab_config(run_dir, setting)
        if not (run_dir / "cache" / "meta.json").is_file():
            write_cache(run_dir / "cache", factor * setting.train_size, data_id(cfg))
        runs[name] = run_dir
    peaks: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run_dir in runs.items():
            shutil.rmtree(run_dir / "perf_memory", ignore_errors=True)
            result = run_with_peak_memory(train_command(run_dir, setting, steps))
            peaks[name].append({key: result[key] for key in ("peak_rss_mib", "peak_anon_mib")})
    cache_mib = {
        name: sum(f.stat().st_size for f in (d / "cache").glob("*.npy")) / 2**20 for name, d in runs.items()
    }
    return {
        name: {key: float(np.median([p[key] for p in values])) for key in values[0]}
        | {"cache_mib": cache_mib[name]}
        for name, values in peaks.items()
    }
