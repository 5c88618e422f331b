"""Start-up of `train` on WebDataset shards as the corpus grows: time to its first step and peak RSS.

    python -m benchmarks.datapath            # 10k rows (100 shards) and 10M rows (100k shards)

For each size it writes a synthetic teacher cache (`embed`'s layout: float16 shards of 8 image + 8
text dimensions, shard files with every sample's key, `valid.npy`) and the manifest of `size / 100`
tar shards of 100 samples, then runs `clipdistill train --train.method openclip_distill
--train.steps 1` (a cached-KD method: it reads the cache) in a fresh process. The shard paths are
symbolic links to one real tar of 100 small JPEGs (only the first batch's shard is read), so the
corpus costs no disk beyond the cache. `first_step_seconds` is the wall time of the `train` stage
in that process, from its start (after Python has imported the package) to its end after the first
step: reading the cache and manifest, building the model and the stream, one step, writing the
model. `process_seconds` is the whole process, imports included (their cost does not depend on the
corpus; on a busy machine it is most of the total). `peak_rss_mib` is the process's peak resident
memory. The synthetic data is deleted afterwards unless --keep.
Results: benchmarks/results/datapath.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from clipdistill.cache import CacheMeta, save_manifest
from clipdistill.checkpoint import save_npy, write_json
from clipdistill.config import load_config
from clipdistill.data.pairs import ShardIndex, keys_digest
from clipdistill.train import data_id

PER_SHARD, DIM, CACHE_SHARD, BATCH = 100, 8, 8192, 32
# the child: import everything, then time the stage alone
TIMED_TRAIN = (
    "import sys, time, json; import clipdistill.train; from clipdistill.cli import main; "
    "start = time.perf_counter(); code = main(sys.argv[1:]); "
    "print(json.dumps({'stage_seconds': time.perf_counter() - start})); sys.exit(code)"
)


def _tar(path: Path) -> list[str]:
    """One real shard: PER_SHARD 48-px JPEGs with captions. Returns its keys."""
    rng = np.random.default_rng(0)
    keys = [f"{i:04d}" for i in range(PER_SHARD)]
    with tarfile.open(path, "w") as tar:
        for key in keys:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
            for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", f"item {key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return keys


def _overrides(folder: Path, rows: int) -> list[str]:
    shards = rows // PER_SHARD
    return [
        "--run_dir", str(folder / "run"),
        "--data.kind", "webdataset",
        "--data.path", str(folder / "shards" / f"{{000000..{shards - 1:06d}}}.tar"),
        "--student.name", "lab-student-tiny",
        "--train.method", "openclip_distill",
        "--train.steps", "1",
        "--train.warmup_steps", "1",
        "--train.batch_size", str(BATCH),
        "--train.device", "cpu",
        "--distill.teacher_logit_scale", "100",  # the synthetic cache records no teacher scale
    ]  # fmt: skip


def write_corpus(folder: Path, rows: int) -> None:
    """The shards (links to one tar), the cache and its manifest of a `rows`-sample corpus."""
    shards = rows // PER_SHARD
    (folder / "shards").mkdir(parents=True)
    real = folder / "real.tar"
    keys = _tar(real)
    for s in range(shards):
        os.symlink(real, folder / "shards" / f"{s:06d}.tar")
    cfg = load_config(None, _overrides(folder, rows))
    cache = folder / "run" / "cache"
    meta = CacheMeta("synthetic", "synthetic", data_id(cfg), rows, DIM, DIM, CACHE_SHARD)
    write_json(cache / "meta.json", meta.__dict__)
    rng = np.random.default_rng(0)
    for s in range(meta.num_shards):
        part = meta.shard_rows(s)
        emb = rng.standard_normal((len(part), 2 * DIM), dtype=np.float32)
        emb[:, :DIM] /= np.linalg.norm(emb[:, :DIM], axis=1, keepdims=True)
        emb[:, DIM:] /= np.linalg.norm(emb[:, DIM:], axis=1, keepdims=True)
        save_npy(cache / f"emb_{s:05d}.npy", emb.astype(np.float16))
        ids = [f"{row // PER_SHARD:06d}/{keys[row % PER_SHARD]}" for row in part]
        write_json(cache / f"shard_{s:05d}.json", {"ids": ids, "valid": [True] * len(part), "skipped": []})
    valid = np.ones(rows, dtype=bool)
    save_npy(cache / "valid.npy", valid)
    index = ShardIndex(np.full(shards, PER_SHARD, np.int64), np.full(shards, keys_digest(keys), np.int64))
    save_manifest(cache, index, valid)


def measure(folder: Path, rows: int) -> dict:
    """Wall seconds and peak RSS of a 1-step `train` in a fresh process."""
    command = [sys.executable, "-c", TIMED_TRAIN, "train", *_overrides(folder, rows)]
    out, err = folder / "stdout.txt", folder / "stderr.txt"
    start = time.perf_counter()
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"train failed at {rows} rows: {err.read_text()[-2000:]}")
    stage = json.loads(out.read_text().strip().splitlines()[-1])["stage_seconds"]
    return {
        "rows": rows,
        "shards": rows // PER_SHARD,
        "first_step_seconds": round(stage, 2),
        "process_seconds": round(seconds, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,10000000", help="comma-separated corpus sizes (rows)")
    parser.add_argument("--workdir", default="runs/datapath")
    parser.add_argument("--out", default="benchmarks/results/datapath.json")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic corpora")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    for rows in sizes:
        folder = Path(args.workdir) / str(rows)
        if folder.exists():
            shutil.rmtree(folder)
        start = time.perf_counter()
        write_corpus(folder, rows)
        print(f"{rows} rows: corpus written in {time.perf_counter() - start:.0f} s", flush=True)
        results[str(rows)] = measure(folder, rows)
        print(json.dumps(results[str(rows)]), flush=True)
        if not args.keep:
            shutil.rmtree(folder)
    small, large = results[str(min(sizes))], results[str(max(sizes))]
    report = {
        "sizes": results,
        "rss_ratio": round(large["peak_rss_mib"] / small["peak_rss_mib"], 3),
        "command": "python -m benchmarks.datapath --sizes " + args.sizes,
        "method": "train --train.method openclip_distill --train.steps 1, lab-student-tiny, batch 32, CPU",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
