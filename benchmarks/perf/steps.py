"""A distillation step against the plain CLIP step of the same student on the same batch, with the
teacher read from the cache (ours) or run live in the loop (open_clip, CLIP-KD, TinyCLIP).

A step is the trainer's own `train_step` (cache rows fetched, autocast, forward, backward, NaN check,
clipping, optimizer and schedule). Batches are sliced once in memory, so only the step is timed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from benchmarks.perf.timing import interleave

from clipdistill.cache import TeacherCache
from clipdistill.config import RunConfig, replace
from clipdistill.data.sources import make_pair_source
from clipdistill.methods import build_task
from clipdistill.models.factory import create_student, create_teacher
from clipdistill.runs import cache_dir
from clipdistill.train import make_trainer, train_step

CACHED = ("cid", "fd", "crd", "icl", "tinyclip_affinity", "openclip_distill", "comkd", "promptkd")
LIVE = ("fd", "crd", "icl", "tinyclip_affinity", "openclip_distill")  # what other tools run live


def lab_batches(cfg: RunConfig, tokenizer, preprocess, count: int, seed: int = 0) -> list[dict]:
    """`count` random training batches of the lab, sliced once (the same rows for every side)."""
    source = make_pair_source(cfg.data, tokenizer, preprocess)
    rng = np.random.default_rng(seed)
    return [source.batch(torch.as_tensor(rng.choice(len(source), cfg.train.batch_size, replace=False)))
            for _ in range(count)]  # fmt: skip


def make_step(cfg: RunConfig, cache: TeacherCache | None, live=None) -> Callable[[dict, dict | None], None]:
    """The trainer's step of `cfg.train.method` on a fresh student (seed 0); `live`: a teacher in the loop."""
    torch.manual_seed(0)
    task = build_task(cfg, create_student(cfg.student).model, cache)
    # a live teacher's rows come with the batch: the trainer then reads no cache rows
    trainer = make_trainer(task, cfg.train, torch.device("cpu"), cache if live is None else None)
    task.train()
    step_index = itertools.count()

    def step(batch: dict, teacher_batch: dict | None) -> None:
        if live is not None:
            with torch.no_grad():
                image = F.normalize(live.encode_image(teacher_batch["image"]).float(), dim=-1)
                text = F.normalize(live.encode_text(teacher_batch["text"]).float(), dim=-1)
            batch = batch | {"teacher_image": image, "teacher_text": text, "cache_row": batch["index"]}
        train_step(trainer, iter([batch]), next(step_index))

    return step


def step_times(cfg: RunConfig, repeats: int, distinct_batches: int = 4) -> dict[str, float]:
    """Median seconds per step of `clip`, each cached method and each live-teacher baseline."""
    cfg = replace(cfg, {"train.accum_steps": 1})  # one batch per step: the batch is what is compared
    cache = TeacherCache(cache_dir(cfg))
    student = create_student(cfg.student)
    batches = lab_batches(cfg, student.tokenizer, student.preprocess, distinct_batches)
    # A live teacher sees every caption fresh, as on a real corpus: no LiT memo of repeated lab captions.
    live_teacher_cfg = replace(cfg, {"teacher.lock_text": False})
    teacher = create_teacher(live_teacher_cfg.teacher, lab_data=cfg.data.kind == "lab")
    teacher_batches = lab_batches(cfg, teacher.tokenizer, teacher.preprocess, distinct_batches)
    runners = {"clip": make_step(cfg, None)}
    for method in CACHED:
        runners[method] = make_step(replace(cfg, {"train.method": method}), cache)
    for method in LIVE:
        live_cfg = replace(cfg, {"train.method": method})
        runners[f"{method} (live teacher)"] = make_step(live_cfg, cache, live=teacher.model)

    def side(run: Callable) -> Callable[[], None]:
        turn = itertools.count()

        def go() -> None:  # one step per turn: the sides alternate step by step
            i = next(turn) % len(batches)
            run(batches[i], teacher_batches[i])

        return go

    sides = {name: side(run) for name, run in runners.items()}
    interleave(sides, 2)  # warm-up: first calls allocate, and AdamW creates its state
    return interleave(sides, repeats)
