"""The one training loop for every method: 1 or N processes, CPU or CUDA, resumable after kill -9.

Outputs in `<run_dir>/<name>/`: `config.yaml` (resolved), `metrics.jsonl`, `checkpoint.pt` (model,
optimizer, scheduler, RNG and step, loadable with weights_only=True), and when finished
`model.safetensors` (open_clip state dict), `heads.safetensors` (task heads, if any) and `done.json`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
from pathlib import Path

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
    save_state_dict,
    save_training_state,
    write_json,
)
from clipdistill.config import ConfigError, RunConfig, TrainConfig, fingerprint, to_dict
from clipdistill.data.sampler import StepSampler
from clipdistill.data.sources import ShardPairs, make_pair_source
from clipdistill.distributed import DistInfo, all_reduce_mean, init_distributed
from clipdistill.methods import build_task, method_sections, needs_teacher_cache, reads_teacher_cache
from clipdistill.methods.comkd import COMKD_METHODS, inductive_pool
from clipdistill.methods.labelled import labelled_pool
from clipdistill.models.factory import create_student, create_teacher

# Settings that may change between a run and its resume without changing the result.
RESUME_FREE_KEYS = ("log_every", "ckpt_every", "resume", "tensorboard", "device")
PAPER_DATA_KEYS = ("dataset", "shots")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} requested but CUDA is not available here (use --train.device cpu)"
        )
    return torch.device(name)


def output_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir) / (cfg.train.name or cfg.train.method)


def cache_dir(cfg: RunConfig) -> Path:
    """The run's teacher cache; a lab target domain (cross-dataset distillation) has its own."""
    return Path(cfg.run_dir) / (f"cache_{cfg.data.domain}" if cfg.data.domain else "cache")


def data_id(cfg: RunConfig) -> str:
    """Identity of the training samples: what the teacher cache is keyed on."""
    d = cfg.data
    if d.kind == "paper":  # the dataset's whole train split: stage 1's few-shot images are rows of it
        return f"paper:{d.dataset}:{d.path}"
    return f"{d.kind}:{d.path or 'default'}:val{d.val_size}:train{d.train_size}"


def param_groups(task: nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on gains, biases, embeddings' scale and temperature."""
    decay, no_decay = [], []
    for name, p in task.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(task: nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (open_clip's betas) or SGD with momentum 0.9 (CoOp's and PromptKD's prompt-tuning recipe)."""
    groups = param_groups(task, tc.weight_decay)
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.98), eps=1e-6)
    if tc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tc.lr, momentum=0.9)
    raise ConfigError(f"train.optimizer must be one of {OPTIMIZERS}, not {tc.optimizer!r}")


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
    values = copy.deepcopy({key: values[key] for key in sections if key in values})
    for key in RESUME_FREE_KEYS:
        values["train"].pop(key, None)
    if values["train"].get("optimizer") == "adamw":  # the default that predates the key: old runs still match
        values["train"].pop("optimizer")
    if values["data"]["kind"] != "paper":  # keys only paper data reads, newer than the others' runs
        for key in PAPER_DATA_KEYS:
            values["data"].pop(key, None)
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
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))


def load_model_for(cfg: RunConfig):
    if cfg.train.role == "teacher":
        return create_teacher(cfg.teacher, trainable=True)
    if cfg.train.role == "student":
        return create_student(cfg.student)
    raise ConfigError(f"train.role must be teacher or student, not {cfg.train.role!r}")


def training_pool(cfg: RunConfig, size: int, cache: TeacherCache | None) -> np.ndarray:
    """Sample indices to train on: all, minus bad samples the cache found, within an optional subset."""
    pool = np.arange(size)
    if cache is not None:
        pool = pool[cache.valid[:size]]
    if cfg.train.subset:
        pool = np.intersect1d(pool, training_subset(cfg))
    if cfg.train.method in COMKD_METHODS and cfg.comkd.inductive:
        pool = inductive_pool(cfg, pool)
    if cfg.train.method == "prompt_teacher":
        pool = labelled_pool(cfg, pool)
    return pool


def training_subset(cfg: RunConfig) -> np.ndarray | None:
    """The sorted sample ids of `train.subset`, if set."""
    if not cfg.train.subset:
        return None
    path = Path(cfg.train.subset)
    if not path.is_absolute():
        path = Path(cfg.run_dir) / path
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


def train(cfg: RunConfig) -> dict:
    """Train `cfg.train.role` with `cfg.train.method`; resumes from `checkpoint.pt` when present."""
    tc = cfg.train
    device = resolve_device(tc.device)
    dist_info: DistInfo = init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    out = output_dir(cfg)
    done_path = out / "done.json"
    if done_path.is_file():
        done = read_json(done_path)
        if done["fingerprint"] == training_fingerprint(cfg):
            return done
        raise ConfigError(
            f"{out} already holds a finished run with another config; choose another --train.name "
            "or delete the folder"
        )
    if tc.batch_size % (tc.accum_steps * dist_info.world_size):
        raise ConfigError(
            f"train.batch_size {tc.batch_size} must divide by accum_steps x world size "
            f"({tc.accum_steps} x {dist_info.world_size})"
        )
    if tc.resume not in ("auto", "never"):
        raise ConfigError(f"train.resume must be auto or never, not {tc.resume!r}")
    if tc.optimizer not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer must be one of {OPTIMIZERS}, not {tc.optimizer!r}")
    ckpt_path = out / "checkpoint.pt"
    run_fp = training_fingerprint(cfg)
    state = None
    if ckpt_path.is_file() and tc.resume == "auto":
        state = safe_torch_load(ckpt_path)  # checked before any work is done
        if state["fingerprint"] != run_fp:
            old = state.get("config")
            changed = _changes(_fingerprinted(old), _fingerprinted(to_dict(cfg))) if old else []
            what = "; ".join(changed[:8]) or f"see {out / 'config.yaml'}"
            raise ConfigError(
                f"{ckpt_path} was written with another config ({what}); "
                "resuming would mix two runs. Use the same config, another --train.name, "
                "or --train.resume never"
            )
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses determinism without it
        torch.use_deterministic_algorithms(True)

    loaded = load_model_for(cfg)
    cache = None
    if needs_teacher_cache(tc.method):
        cache = TeacherCache(cache_dir(cfg))
        cache.check(data_id(cfg))
    elif reads_teacher_cache(tc.method):
        cache = _cache_if_built(cfg)
    task = build_task(cfg, loaded.model, cache).to(device)
    source = make_pair_source(cfg.data, loaded.tokenizer, loaded.preprocess)
    micro_batch = tc.batch_size // tc.accum_steps
    first_micro = (state["step"] if state is not None else 0) * tc.accum_steps
    if isinstance(source, ShardPairs):  # streamed shards: the cache's manifest gives every sample's row
        batches = source.stream(micro_batch // dist_info.world_size, tc.seed, dist_info.rank,
                                dist_info.world_size, first_micro, cache or _cache_if_built(cfg),
                                training_subset(cfg))  # fmt: skip
        pool_size = source.pool_size
    else:
        pool = training_pool(cfg, len(source), cache or _cache_if_built(cfg))
        sampler = StepSampler(pool, micro_batch, tc.seed, dist_info.rank, dist_info.world_size)
        batches = source.batches(sampler.schedule(first_micro, tc.steps * tc.accum_steps))
        pool_size = len(pool)

    optimizer = make_optimizer(task, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(tc.warmup_steps, tc.steps))
    start_step, elapsed = 0, 0.0
    if state is not None:
        task.load_state_dict(state["task"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_step, elapsed = state["step"], state["elapsed"]
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # half-written files of a killed run (see atomic_path)
            stale.unlink()
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        _trim_metrics(out / "metrics.jsonl", start_step)

    model = DistributedDataParallel(task) if dist_info.world_size > 1 else task
    writer = _tensorboard(out) if tc.tensorboard and dist_info.is_main else None
    metrics = open(out / "metrics.jsonl", "a") if dist_info.is_main else None
    skipped = 0
    progress = tqdm(
        total=tc.steps,
        initial=start_step,
        desc=f"train {out.name}",
        unit="step",
        disable=not dist_info.is_main,
        dynamic_ncols=True,
    )
    task.train()
    tick = time.time()
    for step in range(start_step, tc.steps):
        parts_sum: dict[str, float] = {}
        for micro in range(tc.accum_steps):
            batch = next(batches)
            skipped += len(batch["skipped"])
            if dist_info.world_size > 1:
                batch = equalize_batch(batch)
            batch = _to_device(batch, device, cache)
            sync = micro == tc.accum_steps - 1 or dist_info.world_size == 1
            with model.no_sync() if not sync else contextlib.nullcontext(), autocast_for(device, tc.amp):
                parts = model(batch)
                loss = parts["loss"] / tc.accum_steps
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss is {loss.item()} at step {step + 1}: lower --train.lr, keep --train.grad_clip on, "
                    f"and resume from the last good checkpoint in {ckpt_path}"
                )
            loss.backward()
            for key, value in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + float(value.detach()) / tc.accum_steps
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(task.parameters(), tc.grad_clip)
        lr = scheduler.get_last_lr()[0]  # the rate this step used
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        task.after_step()
        done_steps = step + 1
        if done_steps % tc.log_every == 0 or done_steps == tc.steps:
            now = time.time()
            elapsed += now - tick
            tick = now
            record = {k: float(all_reduce_mean(torch.tensor(v))) for k, v in parts_sum.items()}
            record |= {"step": done_steps, "lr": lr, "elapsed": round(elapsed, 2)}
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if writer is not None:
                for key, value in record.items():
                    writer.add_scalar(f"train/{key}", value, done_steps)
            progress.set_postfix(loss=f"{record['loss']:.3f}")
        progress.update(1)
        if done_steps % tc.ckpt_every == 0 or done_steps == tc.steps:
            elapsed += time.time() - tick
            tick = time.time()
            if dist_info.is_main:
                save_training_state(
                    {
                        "task": task.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": _rng_state(),
                        "step": done_steps,
                        "elapsed": elapsed,
                        "fingerprint": run_fp,
                        "config": to_dict(cfg),
                    },
                    ckpt_path,
                )
    progress.close()
    if metrics is not None:
        metrics.close()
    result = {
        "fingerprint": run_fp,
        "steps": tc.steps,
        "train_seconds": round(elapsed, 2),
        "world_size": dist_info.world_size,
        "skipped_samples": skipped,
        "train_samples": int(pool_size),
    }
    if dist_info.is_main:
        save_state_dict(task.model.state_dict(), out / "model.safetensors")
        heads = task.heads()
        if heads:
            save_state_dict(
                {f"{n}.{k}": v for n, h in heads.items() for k, v in h.state_dict().items()},
                out / "heads.safetensors",
            )
        if hasattr(task, "export"):  # outputs a recipe writes besides weights (prompt_teacher's text bank)
            task.export(out)
        write_json(done_path, result)
    return result


def equalize_batch(batch: dict) -> dict:
    """Trim every rank's batch to the smallest one, so gathered contrastive batches line up
    when some rank skipped bad samples (a collective of one integer per step)."""
    size = torch.tensor([len(batch["index"])])
    torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MIN)
    n = int(size)
    return {k: (v[:n] if k != "skipped" and v is not None else v) for k, v in batch.items()}


def _to_device(batch: dict, device: torch.device, cache: TeacherCache | None) -> dict:
    moved = {
        k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
    }
    if cache is not None:
        rows = batch["index"].cpu()  # every source's sample index is its cache row
        image, text = cache.rows(rows)
        moved["teacher_image"], moved["teacher_text"] = image.to(device), text.to(device)
        moved["cache_row"] = torch.as_tensor(rows)
    return moved


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError("train.tensorboard needs the `tensorboard` package: pip install tensorboard") from e
    return SummaryWriter(str(out / "tensorboard"))
