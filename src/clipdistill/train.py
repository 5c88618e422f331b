"""The one training loop for every method: 1 or N processes, CPU or CUDA, resumable after kill -9.

Outputs in `<run_dir>/<name>/`: `config.yaml` (resolved), `metrics.jsonl`, `checkpoint.pt` (model,
optimizer, scheduler, RNG and step, loadable with weights_only=True), and when finished what the
task exports (`model.safetensors`, `heads.safetensors` when it has heads, ...) and `done.json`.
The trainer knows recipes only through the `Task` contract (methods/task.py).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from clipdistill.cache import CacheMismatchError, TeacherCache
from clipdistill.checkpoint import (
    atomic_write,
    read_json,
    safe_torch_load,
    save_training_state,
    write_json,
)
from clipdistill.config import (
    NEWER_DEFAULTS,
    ConfigError,
    DistillConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
    fingerprint,
    to_dict,
    trained_config,
)
from clipdistill.data.sampler import StepSampler
from clipdistill.data.sources import ShardPairs, make_pair_source
from clipdistill.data.views import apply_views, pick_views, step_views
from clipdistill.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_mean,
    init_distributed,
    resolve_device,
)
from clipdistill.methods import (
    method_lab_data_keys,
    method_sections,
    method_unread_keys,
    needs_teacher_cache,
    task_class,
)
from clipdistill.methods.task import TERM, CacheUse, Task, loss_terms
from clipdistill.models.factory import create_student, create_teacher
from clipdistill.runs import cache_dir, data_id, exclusive, output_dir, run_path, sweep_temps

# Settings that may change between a run and its resume without changing the result.
RESUME_FREE_KEYS = ("log_every", "ckpt_every", "resume", "tensorboard", "device", "grad_share")
PAPER_DATA_KEYS = ("dataset", "shots")
EVAL_DATA_KEYS = ("label_key", "split_key")  # read by the own-data eval only, never by training


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def param_groups(task: Task, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on gains, biases, embeddings' scale and temperature."""
    decay, no_decay = [], []
    for name, p in task.trainable_parameters():
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def make_optimizer(task: Task, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (open_clip's betas) or SGD with momentum 0.9 (CoOp's choice for a few context vectors).

    AdamW runs fused (one kernel over all parameters, on CPU and GPU) instead of looping over them:
    part of the faster lab student step measured in benchmarks/README.md, "The lab grid"."""
    groups = param_groups(task, tc.weight_decay)
    if tc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tc.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)


def cosine_with_warmup(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def autocast_for(device: torch.device, enabled: bool):
    """bf16 autocast on GPUs that support it; CPUs here run fp32 (bf16 is slower without AMX)."""
    use = enabled and device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use)


def _fingerprinted(values: dict) -> dict:
    """The settings a training result depends on: the data, the models, the trainer and the
    method's own sections; not logging, evaluation, the demo's plan or other methods' settings."""
    sections = ("data", "teacher", "student", "train", *method_sections(values["train"]["method"]))
    embed = values.get("embed", {})
    values = copy.deepcopy({key: values[key] for key in sections if key in values})
    if embed.get("views", 1) > 1:  # a reinforced cache: its views are part of what the student sees
        values["views"] = {key: embed[key] for key in ("views", "view_min_scale", "view_seed")}
    if embed.get("ensemble"):  # so are the other teachers of an ensemble
        values["ensemble"] = list(embed["ensemble"])
    for key in RESUME_FREE_KEYS:
        values["train"].pop(key, None)
    if values["train"].get("optimizer") == "adamw":  # the default that predates the key: old runs still match
        values["train"].pop("optimizer")
    if values["data"]["kind"] != "paper":  # keys only paper data reads, newer than the others' runs
        read = method_lab_data_keys(values["train"]["method"]) if values["data"]["kind"] == "lab" else ()
        for key in PAPER_DATA_KEYS:
            if key not in read:
                values["data"].pop(key, None)
    for model in ("teacher", "student"):  # a key that was never read, since removed: older runs still match
        values[model].setdefault("precision", "fp32")
    for key in EVAL_DATA_KEYS:
        values["data"].pop(key, None)
    if "distill" in values:  # what trains: each key left at None is the method's origin value
        resolved = config_from_dict(values["distill"], DistillConfig).for_method(values["train"]["method"])
        values["distill"] = to_dict(resolved)
    for section, keys in method_unread_keys(values["train"]["method"], values).items():
        for key, recorded in keys.items():  # never read: its default can change under the runs
            values.get(section, {}).pop(key, None)
            if recorded is not None and section in values:
                values[section][key] = recorded
    for section, defaults in NEWER_DEFAULTS.items():
        for key, default in defaults.items():
            if section in values and values[section].get(key) == default:
                values[section].pop(key)
    return values


def training_fingerprint(cfg: RunConfig) -> str:
    return fingerprint(_fingerprinted(to_dict(cfg)))


def _changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`section.key old -> new` for every setting that differs."""
    out = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out


def _changed_settings(made_with: dict | None, cfg: RunConfig, folder: Path) -> str:
    """The settings that differ between the config a run was made with and `cfg`, for a refusal."""
    changed = _changes(_fingerprinted(made_with), _fingerprinted(to_dict(cfg))) if made_with else []
    return "; ".join(changed[:8]) or f"see {folder / 'config.yaml'}"


def _trim_metrics(path: Path, last_step: int) -> None:
    """Keep the metrics of the steps up to the checkpoint: a resumed run logs the later ones again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line cut short by kill -9
    atomic_write(path, lambda tmp: tmp.write_text("".join(kept)))


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():  # the current device's generator (dropout, random init on the GPU)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_model_for(cfg: RunConfig, task_cls: type[Task]):
    if cfg.train.role == "teacher" and task_cls.adapts_pretrained_teacher:
        return create_teacher(cfg.teacher, lab_data=cfg.data.kind == "lab")
    if cfg.train.role == "teacher":
        return create_teacher(cfg.teacher, trainable=True)
    return create_student(cfg.student)


@dataclass
class Run:
    """Where this process trains: its device and rank, the output folder and the state to resume."""

    cfg: RunConfig
    device: torch.device
    dist: DistInfo
    out: Path
    fingerprint: str
    finished: dict | None = None  # done.json of a finished run of this config
    state: dict | None = None  # checkpoint.pt to resume from

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint.pt"


def open_run(cfg: RunConfig) -> Run:
    """The run's device, ranks and folder; a finished run, a batch that cannot be split or a checkpoint
    of another config are found here, before any work."""
    tc = cfg.train
    device = resolve_device(tc.device)
    dist_info = init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    run = Run(cfg, device, dist_info, output_dir(cfg), training_fingerprint(cfg))
    done_path = run.out / "done.json"
    if done_path.is_file():
        run.finished = read_json(done_path)
        if run.finished["fingerprint"] == run.fingerprint:
            return run
        made_with = to_dict(trained_config(run.out)) if (run.out / "config.yaml").is_file() else None
        raise ConfigError(
            f"{run.out} already holds a finished run with another config "
            f"({_changed_settings(made_with, cfg, run.out)}); use its settings, another --train.name, "
            "or delete the folder"
        )
    if tc.warmup_steps < 0:
        raise ConfigError(f"train.warmup_steps {tc.warmup_steps}: steps of warm-up, 0 or more (0: none)")
    if tc.warmup_steps > tc.steps and dist_info.is_main:
        print(
            f"clipdistill train: note: train.warmup_steps {tc.warmup_steps} > train.steps {tc.steps}: the "
            f"learning rate reaches {tc.steps / tc.warmup_steps:.0%} of train.lr (see --train.warmup_steps)",
            file=sys.stderr,
        )
    if tc.augment > 0 and needs_teacher_cache(tc.method):
        raise ConfigError(
            f"train.augment crops a run without a teacher cache; {tc.method!r} reads one: give it views "
            "with `embed --embed.views N`, whose targets are the teacher's embeddings of those crops"
        )
    if tc.batch_size % (tc.accum_steps * dist_info.world_size):
        raise ConfigError(
            f"train.batch_size {tc.batch_size} must divide by accum_steps x world size "
            f"({tc.accum_steps} x {dist_info.world_size})"
        )
    if run.checkpoint.is_file() and tc.resume == "auto":
        run.state = safe_torch_load(run.checkpoint)  # checked before any work is done
        if run.state["fingerprint"] != run.fingerprint:
            what = _changed_settings(run.state.get("config"), cfg, run.out)
            raise ConfigError(
                f"{run.checkpoint} was written with another config ({what}); "
                "resuming would mix two runs. Use the same config, another --train.name, "
                "or --train.resume never"
            )
    return run


def seed_everything(tc: TrainConfig) -> None:
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses determinism without it
        torch.use_deterministic_algorithms(True)


def check_batch(batch: dict, step: int) -> None:
    """A batch in which every sample was skipped stops training with one line (not a conv2d error)."""
    if len(batch["index"]) == 0:
        reasons = sorted({reason for reason, _ in batch["skipped"]})
        examples = [key for _, key in batch["skipped"][:3]]
        raise ValueError(
            f"step {step + 1}: every sample of the batch was skipped ({len(batch['skipped'])}: {reasons}, "
            f"e.g. {examples}); run `clipdistill embed` first so training draws only valid samples, and "
            "check the data (image paths are read relative to the table's folder)"
        )


def training_subset(cfg: RunConfig) -> np.ndarray | None:
    """The sorted sample ids of `train.subset`, if set."""
    if not cfg.train.subset:
        return None
    path = run_path(cfg, cfg.train.subset)
    if not path.is_file():
        raise ConfigError(f"train.subset {path} does not exist (run `clipdistill balance` first)")
    return np.unique(np.load(path, allow_pickle=False))


def _cache_if_built(cfg: RunConfig) -> TeacherCache | None:
    """The run's finished teacher cache of this data, if any: its validity keeps the bad samples `embed`
    found out of the pool of methods that do not read the cache (so batches stay full)."""
    try:
        cache = TeacherCache(cache_dir(cfg))
        cache.check(data_id(cfg))
    except (FileNotFoundError, CacheMismatchError):
        return None
    return cache


def load_cache(cfg: RunConfig, use: CacheUse) -> TeacherCache | None:
    """The teacher cache whose rows the batches carry: checked when the task requires it, when built
    for a task that can use it, none for a task that does not."""
    if use is CacheUse.REQUIRED:
        cache = TeacherCache(cache_dir(cfg))
        cache.check(data_id(cfg))
        return cache
    return _cache_if_built(cfg) if use is CacheUse.OPTIONAL else None


def training_pool(cfg: RunConfig, task: Task, size: int, cache: TeacherCache | None) -> np.ndarray:
    """Sample indices to train on: all, minus bad samples the cache found, within an optional subset,
    then as the task selects."""
    pool = np.arange(size)
    if cache is not None:
        pool = pool[cache.valid[:size]]
    if cfg.train.subset:
        pool = np.intersect1d(pool, training_subset(cfg))
    pool = task.training_pool(pool)
    if len(pool) == 0:
        valid = int(cache.valid[:size].sum()) if cache is not None else size
        raise ConfigError(
            f"no sample to train on: {valid} of {size} samples are valid in the teacher cache, none of them "
            f"in train.subset {cfg.train.subset!r} or the method's pool; see {cache_dir(cfg) / 'report.json'}"
        )
    return pool


@dataclass
class Trainer:
    """What a training step uses and changes: the task (and its DDP wrapper), the optimizer and schedule."""

    task: Task
    model: nn.Module  # the task, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    tc: TrainConfig
    device: torch.device
    cache: TeacherCache | None = None
    world_size: int = 1
    checkpoint: Path | None = None  # named when the loss diverges


def make_trainer(task: Task, tc: TrainConfig, device: torch.device, cache: TeacherCache | None = None,
                 world_size: int = 1, checkpoint: Path | None = None) -> Trainer:  # fmt: skip
    """`task` on `device` with its optimizer and cosine schedule (DDP when there are several ranks)."""
    task = task.to(device)
    optimizer = make_optimizer(task, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(tc.warmup_steps, tc.steps))
    model = DistributedDataParallel(task) if world_size > 1 else task
    return Trainer(task, model, optimizer, scheduler, tc, device, cache, world_size, checkpoint)


def is_log_step(tc: TrainConfig, done_steps: int) -> bool:
    return done_steps % tc.log_every == 0 or done_steps == tc.steps


def gradient_shares(task: Task, parts: dict[str, torch.Tensor]) -> dict[str, float]:
    """`grad_norm/<term>`: the norm of each loss term's gradient on the trainable parameters that every
    term reaching any parameter shares; `grad_share/<term>`: its part of the sum of those norms.

    A term that reaches no parameter (inert) gets norm 0. Uses `torch.autograd.grad` with the graph
    kept for the step's backward: parameters' `.grad` and the random state are left untouched.
    """
    terms = loss_terms(parts)
    params = [p for _, p in task.trainable_parameters()]
    grads = {}
    for name, term in terms.items():
        if term.requires_grad:
            grads[name] = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        else:
            grads[name] = [None] * len(params)
    reaching = [g for g in grads.values() if any(x is not None for x in g)]
    shared = [i for i in range(len(params)) if reaching and all(g[i] is not None for g in reaching)]
    norms = {}
    for name, g in grads.items():
        squares = [g[i].detach().float().pow(2).sum() for i in shared if g[i] is not None]
        norms[name] = float(torch.stack(squares).sum().sqrt()) if squares else 0.0
    total = sum(norms.values())
    out = {f"grad_norm/{name}": norm for name, norm in norms.items()}
    out |= {f"grad_share/{name}": (norm / total if total > 0 else 0.0) for name, norm in norms.items()}
    return out


class StepResult(NamedTuple):
    parts: dict[str, float]  # the loss and its parts, averaged over the micro-batches
    lr: float  # the rate this step used
    skipped: list[str]  # ids of the unreadable samples the batches left out


def train_step(trainer: Trainer, batches: Iterator[dict], step: int) -> StepResult:
    """One optimizer step over `accum_steps` micro-batches of `batches`: forward and backward under
    autocast (DDP syncs the last one), a stop on a NaN/inf loss, clipping, optimizer and schedule."""
    tc, model = trainer.tc, trainer.model
    parts_sum: dict[str, float] = {}
    skipped = []
    for micro in range(tc.accum_steps):
        batch = next(batches)
        check_batch(batch, step)
        skipped += [str(key) for _, key in batch["skipped"]]
        if trainer.world_size > 1:
            batch = equalize_batch(batch)
        batch = prepare_batch(batch, trainer.device, trainer.cache, step, tc.seed, tc.augment)
        sync = micro == tc.accum_steps - 1 or trainer.world_size == 1
        with model.no_sync() if not sync else contextlib.nullcontext(), autocast_for(trainer.device, tc.amp):
            parts = model(batch)
            loss = parts["loss"] / tc.accum_steps
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss.item()} at step {step + 1}: lower --train.lr, keep --train.grad_clip on, "
                f"and resume from the last good checkpoint in {trainer.checkpoint}"
            )
        if tc.grad_share and micro == 0 and is_log_step(tc, step + 1):  # measured on the first micro-batch
            parts_sum |= gradient_shares(trainer.task, parts)
        loss.backward()
        for key, value in parts.items():
            if not key.startswith(TERM):  # the terms are in "loss" and its logged parts already
                parts_sum[key] = parts_sum.get(key, 0.0) + float(value.detach()) / tc.accum_steps
    if tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainer.task.parameters(), tc.grad_clip)
    lr = trainer.scheduler.get_last_lr()[0]
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.task.after_step()
    return StepResult(parts_sum, lr, skipped)


def build(cfg: RunConfig, run: Run) -> tuple[Trainer, object]:
    """The model, the task of `train.method` around it, its cache and the data."""
    task_cls = task_class(cfg.train.method)
    loaded = load_model_for(cfg, task_cls)
    cache = load_cache(cfg, task_cls.cache_use)
    if cfg.train.augment > 0 and cache is not None:  # a method that reads the cache once it is built
        raise ConfigError(
            f"train.augment crops a run without a teacher cache; this {cfg.train.method!r} run reads "
            f"the one in {cache_dir(cfg)}, whose targets are the teacher's embeddings of the plain images"
        )
    task = task_cls.from_config(cfg, loaded.model, cache).to(run.device)
    source = make_pair_source(cfg.data, loaded.tokenizer, loaded.preprocess)
    trainer = make_trainer(task, cfg.train, run.device, cache, run.dist.world_size, run.checkpoint)
    return trainer, source


def restore(trainer: Trainer, state: dict | None) -> tuple[int, float, list[str]]:
    """Load a checkpoint's weights, optimizer, schedule and RNG; returns its step, its seconds and the
    samples it skipped."""
    if state is None:
        return 0, 0.0, []
    trainer.task.load_state_dict(state["task"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["step"], state["elapsed"], state.get("skipped", [])


def prepare_folder(run: Run, start_step: int) -> None:
    """The output folder without a killed run's half-written files, with the resolved config."""
    if not run.dist.is_main:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    sweep_temps(run.out)
    config = yaml.safe_dump(to_dict(run.cfg), sort_keys=False)
    atomic_write(run.out / "config.yaml", lambda tmp: tmp.write_text(config))
    _trim_metrics(run.out / "metrics.jsonl", start_step)


def training_batches(run: Run, trainer: Trainer, source, start_step: int) -> tuple[Iterator[dict], int]:
    """This rank's micro-batches from `start_step` on, in the order an uninterrupted run sees them, and
    the number of samples the run draws from."""
    cfg, tc, info = run.cfg, run.cfg.train, run.dist
    micro_batch = tc.batch_size // tc.accum_steps
    first_micro = start_step * tc.accum_steps
    cache = trainer.cache or _cache_if_built(cfg)  # its validity keeps bad samples out of every pool
    if isinstance(source, ShardPairs):  # streamed shards: the cache's manifest gives every sample's row
        batches = source.stream(micro_batch, tc.seed, info.rank, info.world_size, first_micro, cache,
                                training_subset(cfg))  # fmt: skip
        return batches, source.pool_size
    pool = training_pool(cfg, trainer.task, len(source), cache)
    sampler = StepSampler(pool, micro_batch, tc.seed, info.rank, info.world_size)
    return source.batches(sampler.schedule(first_micro, tc.steps * tc.accum_steps)), len(pool)


class TrainLog:
    """The training clock, metrics.jsonl, TensorBoard and the progress bar (main process writes)."""

    def __init__(self, run: Run, start_step: int, elapsed: float, skipped: list[str]) -> None:
        self.run, self.tc = run, run.cfg.train
        main = run.dist.is_main
        self.writer = _tensorboard(run.out) if self.tc.tensorboard and main else None
        self.metrics = open(run.out / "metrics.jsonl", "a") if main else None
        self.progress = tqdm(total=self.tc.steps, initial=start_step, desc=f"train {run.out.name}",
                             unit="step", disable=not main, dynamic_ncols=True)  # fmt: skip
        self.elapsed, self.tick, self.skipped = elapsed, time.time(), set(skipped)

    def lap(self) -> float:
        """Training seconds so far (a resumed run counts its earlier ones)."""
        now = time.time()
        self.elapsed += now - self.tick
        self.tick = now
        return self.elapsed

    def step(self, done_steps: int, result: StepResult) -> None:
        self.skipped.update(result.skipped)
        if is_log_step(self.tc, done_steps):
            record = {k: float(all_reduce_mean(torch.tensor(v))) for k, v in result.parts.items()}
            record |= {"step": done_steps, "lr": result.lr, "elapsed": round(self.lap(), 2)}
            if self.metrics is not None:
                self.metrics.write(json.dumps(record) + "\n")
                self.metrics.flush()
            if self.writer is not None:
                for key, value in record.items():
                    self.writer.add_scalar(f"train/{key}", value, done_steps)
            self.progress.set_postfix(loss=f"{record['loss']:.3f}")
        self.progress.update(1)

    def skipped_on_any_rank(self) -> list[str]:
        """Every sample skipped so far, once each however many epochs met it (a collective)."""
        return sorted(set().union(*all_gather_objects(sorted(self.skipped))))

    def close(self) -> None:
        self.progress.close()
        if self.metrics is not None:
            self.metrics.close()


def save_checkpoint(run: Run, trainer: Trainer, done_steps: int, elapsed: float, skipped: list[str]) -> None:
    if run.dist.is_main:
        state = {
            "task": trainer.task.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "rng": _rng_state(),
            "step": done_steps,
            "elapsed": elapsed,
            "skipped": skipped,
            "fingerprint": run.fingerprint,
            "config": to_dict(run.cfg),
        }
        save_training_state(state, run.checkpoint)


def finish(run: Run, trainer: Trainer, log: TrainLog, pool_size: int) -> dict:
    """What the task exports, then done.json (written last: it marks the run finished)."""
    log.close()
    result = {
        "fingerprint": run.fingerprint,
        "steps": run.cfg.train.steps,
        "train_seconds": round(log.elapsed, 2),
        "world_size": run.dist.world_size,
        "skipped_samples": len(log.skipped_on_any_rank()),
        "train_samples": int(pool_size),
    }
    if run.dist.is_main:
        trainer.task.export(run.out)
        write_json(run.out / "done.json", result)
    return result


def train(cfg: RunConfig) -> dict:
    """Train `cfg.train.role` with `cfg.train.method`; resumes from `checkpoint.pt` when present."""
    with exclusive(output_dir(cfg)):
        run = open_run(cfg)
        if run.finished is not None:
            return run.finished
        seed_everything(cfg.train)
        trainer, source = build(cfg, run)
        # the data before the checkpoint's RNG: a stream's loader draws its workers' seed when it starts
        batches, pool_size = training_batches(run, trainer, source, run.state["step"] if run.state else 0)
        start_step, elapsed, skipped = restore(trainer, run.state)
        prepare_folder(run, start_step)
        log = TrainLog(run, start_step, elapsed, skipped)
        trainer.task.train()
        for step in range(start_step, cfg.train.steps):
            log.step(step + 1, train_step(trainer, batches, step))
            if (step + 1) % cfg.train.ckpt_every == 0 or step + 1 == cfg.train.steps:
                save_checkpoint(run, trainer, step + 1, log.lap(), log.skipped_on_any_rank())
        return finish(run, trainer, log, pool_size)


def equalize_batch(batch: dict) -> dict:
    """Trim every rank's batch to the smallest one, so gathered contrastive batches line up
    when some rank skipped bad samples (a collective of one integer per step)."""
    size = torch.tensor([len(batch["index"])])
    torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MIN)
    n = int(size)
    return {k: (v[:n] if k != "skipped" and v is not None else v) for k, v in batch.items()}


def prepare_batch(
    batch: dict,
    device: torch.device,
    cache: TeacherCache | None,
    step: int = 0,
    seed: int = 0,
    augment: float = 0.0,
) -> dict:
    """The batch on `device`, with the cached teacher rows of its samples when there is a cache.

    A reinforced cache (N views) gives each sample the view `pick_views(seed, step, row)`: its crop
    and flip are applied to the student's pixels and its teacher embedding is the target, so a
    resumed run and any number of ranks draw the same views. Without a cache, `augment` > 0 crops and
    flips each sample afresh at every step (`step_views`), as reproducibly."""
    moved = {
        k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
    }
    if cache is not None:
        rows = batch["index"].cpu()  # every source's sample index is its cache row
        if cache.meta.views > 1:
            view = pick_views(seed, step, rows.numpy(), cache.meta.views)
            image, text, params = cache.view_rows(rows, view)
            moved["image"] = apply_views(moved["image"], params)
        else:
            image, text = cache.rows(rows)
        moved["teacher_image"], moved["teacher_text"] = image.to(device), text.to(device)
        moved["cache_row"] = torch.as_tensor(rows)
    elif augment > 0:
        params = step_views(seed, step, batch["index"].cpu().numpy(), augment)
        moved["image"] = apply_views(moved["image"], torch.from_numpy(params))
    return moved


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError("train.tensorboard needs the `tensorboard` package: pip install tensorboard") from e
    return SummaryWriter(str(out / "tensorboard"))
