"""Item 2: the whole training loop (`clipdistill.train`: data pipeline, logging, checkpoints) against
a bare forward/backward/step loop of the same student on batches already in memory."""

from __future__ import annotations

import shutil
import time

import torch
from benchmarks.perf.steps import lab_batches
from benchmarks.perf.timing import interleave

from clipdistill.config import RunConfig, replace
from clipdistill.methods.clip import ClipTask
from clipdistill.models.factory import create_student
from clipdistill.runs import output_dir
from clipdistill.train import param_groups, train


def bare_loop(cfg: RunConfig, batches: list[dict], steps: int) -> float:
    """Seconds of `steps` plain CLIP steps (no clipping, scheduler, logging or checkpoints)."""
    torch.manual_seed(cfg.train.seed)
    task = ClipTask(create_student(cfg.student).model).train()
    optimizer = torch.optim.AdamW(param_groups(task, cfg.train.weight_decay), lr=cfg.train.lr)
    start = time.perf_counter()
    for step in range(steps):
        loss = task(batches[step % len(batches)])["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def trainer_loop(cfg: RunConfig) -> float:
    """Seconds of the trainer's loop (its own `train_seconds`: set-up and final export left out)."""
    shutil.rmtree(output_dir(cfg), ignore_errors=True)
    seconds = train(cfg)["train_seconds"]
    shutil.rmtree(output_dir(cfg))
    return seconds


def loop_times(cfg: RunConfig, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds of `steps` steps: `trainer` (lab settings: log every 20, checkpoint every 200
    steps and at the end) and `bare`."""
    run = replace(cfg, {"train.method": "clip", "train.steps": steps, "train.name": "perf_loop",
                        "train.resume": "never"})  # fmt: skip
    student = create_student(cfg.student)
    batches = lab_batches(cfg, student.tokenizer, student.preprocess, min(steps, 8))
    sides = {"trainer": lambda: trainer_loop(run), "bare": lambda: bare_loop(run, batches, steps)}
    return interleave(sides, repeats)
