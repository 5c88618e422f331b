"""Item 1: a distillation step against the plain CLIP step of the same student on the same batch,
with the teacher read from the cache (ours) or run live in the loop (open_clip, CLIP-KD, TinyCLIP).

A step is what the trainer does per batch (`clipdistill.train`): fetch the cache rows, forward,
backward, clip, optimizer step. Batches are sliced once in memory, so only the step is timed.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from benchmarks.perf.fixtures import with_method
from benchmarks.perf.timing import interleave

from clipdistill.cache import TeacherCache
from clipdistill.config import RunConfig
from clipdistill.data.sources import make_pair_source
from clipdistill.methods import build_task
from clipdistill.models.factory import create_student, create_teacher
from clipdistill.train import _to_device, cache_dir, param_groups

CACHED = ("cid", "fd", "crd", "icl", "tinyclip_affinity", "openclip_distill", "comkd", "promptkd")
LIVE = ("fd", "crd", "icl", "tinyclip_affinity", "openclip_distill")  # what other tools run live


def lab_batches(cfg: RunConfig, tokenizer, preprocess, count: int, seed: int = 0) -> list[dict]:
    """`count` random training batches of the lab, sliced once (the same rows for every side)."""
    source = make_pair_source(cfg.data, tokenizer, preprocess)
    rng = np.random.default_rng(seed)
    return [source.batch(torch.as_tensor(rng.choice(len(source), cfg.train.batch_size, replace=False)))
            for _ in range(count)]  # fmt: skip


def make_step(cfg: RunConfig, cache: TeacherCache | None, live=None) -> Callable[[dict, dict | None], None]:
    """A trainer step of `cfg.train.method` on a fresh student (seed 0); `live`: teacher run in the loop."""
    torch.manual_seed(0)
    task = build_task(cfg, create_student(cfg.student).model, cache)
    task.train()
    optimizer = torch.optim.AdamW(param_groups(task, cfg.train.weight_decay), lr=cfg.train.lr)

    def step(batch: dict, teacher_batch: dict | None) -> None:
        if live is None:
            batch = _to_device(batch, torch.device("cpu"), cache)
        else:
            with torch.no_grad():
                image = F.normalize(live.encode_image(teacher_batch["image"]).float(), dim=-1)
                text = F.normalize(live.encode_text(teacher_batch["text"]).float(), dim=-1)
            batch = batch | {"teacher_image": image, "teacher_text": text, "cache_row": batch["index"]}
        parts = task(batch)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        task.after_step()
        _ = {k: float(v.detach()) for k, v in parts.items()}  # the trainer logs every part each step

    return step


def step_times(cfg: RunConfig, repeats: int, distinct_batches: int = 4) -> dict[str, float]:
    """Median seconds per step of `clip`, each cached method and each live-teacher baseline."""
    cache = TeacherCache(cache_dir(cfg))
    student = create_student(cfg.student)
    batches = lab_batches(cfg, student.tokenizer, student.preprocess, distinct_batches)
    # A live teacher sees every caption fresh, as on a real corpus: no LiT memo of repeated lab captions.
    lab = cfg.data.kind == "lab"
    teacher = create_teacher(dataclasses.replace(cfg.teacher, lock_text=False), lab_data=lab)
    teacher_batches = lab_batches(cfg, teacher.tokenizer, teacher.preprocess, distinct_batches)
    runners = {"clip": make_step(cfg, None)}
    for method in CACHED:
        runners[method] = make_step(with_method(cfg, method), cache)
    for method in LIVE:
        runners[f"{method} (live teacher)"] = make_step(with_method(cfg, method), cache, live=teacher.model)

    def side(run: Callable) -> Callable[[], None]:
        turn = itertools.count()

        def go() -> None:  # one step per turn: the sides alternate step by step
            i = next(turn) % len(batches)
            run(batches[i], teacher_batches[i])

        return go

    sides = {name: side(run) for name, run in runners.items()}
    interleave(sides, 2)  # warm-up: first calls allocate, and AdamW creates its state
    return interleave(sides, repeats)
