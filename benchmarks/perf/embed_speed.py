"""Item 3: the `embed` stage (data, teacher, normalisation, fp16 shards on disk) against a bare
`encode_image` loop of the same teacher on pixels already in memory."""

from __future__ import annotations

import shutil
import time

import torch
from benchmarks.perf.timing import interleave

from clipdistill.config import RunConfig
from clipdistill.data.sources import make_pair_source
from clipdistill.embed import run_embed
from clipdistill.models.factory import create_teacher
from clipdistill.runs import cache_dir


def embed_stage(cfg: RunConfig) -> float:
    """Seconds `embed` spends building the cache (its report; loading the teacher left out)."""
    shutil.rmtree(cache_dir(cfg), ignore_errors=True)
    return run_embed(cfg)["seconds"]


def bare_encode(teacher, images: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for batch in images:
            teacher.encode_image(batch)
    return time.perf_counter() - start


def embed_times(cfg: RunConfig, repeats: int) -> dict[str, float]:
    """Median seconds over the same samples: `embed` (image and text) and `bare` (images only)."""
    teacher = create_teacher(cfg.teacher, lab_data=cfg.data.kind == "lab")
    source = make_pair_source(cfg.data, teacher.tokenizer, teacher.preprocess)
    size = cfg.embed.batch_size
    images = [
        source.batch(torch.arange(i, min(i + size, len(source))))["image"]
        for i in range(0, len(source), size)
    ]
    sides = {"embed": lambda: embed_stage(cfg), "bare": lambda: bare_encode(teacher.model, images)}
    return interleave(sides, repeats)
