"""Item 6: images/s that the data pipeline decodes and transforms (resize, crop, normalise to 224 px)
from JPEG files listed in a CSV and from WebDataset tar shards, with 0 workers and with one worker
per core the process may use."""

from __future__ import annotations

import io
import itertools
import os
import tarfile
import time
from pathlib import Path

import numpy as np
from benchmarks.perf.timing import interleave
from PIL import Image

from clipdistill.config import DataConfig
from clipdistill.data.lab import CLASSNAMES
from clipdistill.data.sources import ShardPairs, TablePairs
from clipdistill.models.factory import Preprocess, build_tokenizer, load_model_config

SIZE = 224
PREPROCESS = Preprocess(SIZE, (0.481, 0.458, 0.408), (0.269, 0.261, 0.276))  # CLIP's mean and std


def jpeg_bytes(rng: np.random.Generator, side: int = 256) -> bytes:
    """A smooth random photo-like image (noise alone would be an unusually hard JPEG)."""
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((side, side), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (side, side, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_corpus(folder: Path, count: int, per_shard: int = 256) -> tuple[Path, str]:
    """`count` JPEGs as files + pairs.csv, and the same samples as WebDataset shards."""
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "pairs.csv"
    shards = -(-count // per_shard)
    urls = str(folder / f"shard-{{000..{shards - 1:03d}}}.tar")
    if table.is_file():
        return table, urls
    rng = np.random.default_rng(0)
    lines = ["filepath,title"]
    tars = [tarfile.open(folder / f"shard-{s:03d}.tar", "w") for s in range(shards)]
    for i in range(count):
        data, caption = jpeg_bytes(rng), f"a photo of a {CLASSNAMES[i % len(CLASSNAMES)]}."
        (folder / f"{i:06d}.jpg").write_bytes(data)
        lines.append(f"{i:06d}.jpg,{caption}")
        for name, blob in ((f"{i:06d}.jpg", data), (f"{i:06d}.txt", caption.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tars[i // per_shard].addfile(info, io.BytesIO(blob))
    for tar in tars:
        tar.close()
    table.write_text("\n".join(lines) + "\n")
    return table, urls


def usable_cores() -> int:
    return len(os.sched_getaffinity(0))


def loading_rates(folder: Path, count: int, batch: int, repeats: int) -> dict[str, float]:
    """Images/s (medians) of each (format, workers) pair over `count` samples, and images per CPU
    second of one process without workers: the per-core rate, which the machine's load does not change."""
    table, urls = write_corpus(folder, count)
    tokenizer = build_tokenizer(load_model_config("lab-student"))
    batches = count // batch
    order = [np.arange(i * batch, (i + 1) * batch) for i in range(batches)]
    cpu: dict[str, list[float]] = {"jpeg files": [], "webdataset shards": []}
    sides = {}
    for workers in sorted({0, usable_cores()}):
        csv = TablePairs(DataConfig(kind="csv", path=str(table), num_workers=workers), tokenizer, PREPROCESS)
        wds = ShardPairs(DataConfig(kind="webdataset", path=urls, num_workers=workers), tokenizer, PREPROCESS)
        timed = cpu if workers == 0 else None
        sides[f"jpeg files, {workers} workers"] = lambda csv=csv, timed=timed: _drain(
            csv.batches(order), timed and timed["jpeg files"]
        )
        sides[f"webdataset shards, {workers} workers"] = lambda wds=wds, timed=timed: _drain(
            itertools.islice(wds.stream(batch, 0, 0, 1, 0), batches), timed and timed["webdataset shards"]
        )
    rates = {name: batches * batch / s for name, s in interleave(sides, repeats).items()}
    for name, seconds in cpu.items():
        rates[f"{name}, per CPU second"] = batches * batch / sorted(seconds)[len(seconds) // 2]
    return rates


def _drain(batches, cpu_seconds: list[float] | None = None) -> float:
    """Wall seconds to read every batch; appends the process's CPU seconds to `cpu_seconds` if given."""
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in batches:
        pass
    if cpu_seconds is not None:
        cpu_seconds.append(time.process_time() - start_cpu)
    return time.perf_counter() - start
