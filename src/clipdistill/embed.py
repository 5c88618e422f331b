"""The `embed` stage: run the teacher once over the training data and store its embeddings."""

from __future__ import annotations

from pathlib import Path

import torch

from clipdistill.cache import (
    CacheMeta,
    TeacherCache,
    build_cache,
    check_manifest,
    save_manifest,
    teacher_fingerprint,
)
from clipdistill.checkpoint import write_json
from clipdistill.config import RunConfig
from clipdistill.data.sources import ShardPairs, make_pair_source
from clipdistill.distributed import init_distributed
from clipdistill.models.factory import create_teacher
from clipdistill.train import cache_dir, data_id, resolve_device


def run_embed(cfg: RunConfig) -> dict:
    """Build (or finish) `<run_dir>/cache`; refuses a cache from another teacher or other data.
    Under torchrun the ranks share the shards (`build_cache`); the result is the same bytes."""
    device = resolve_device(cfg.embed.device)
    dist_info = init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    teacher = create_teacher(cfg.teacher)
    teacher.model.to(device)
    source = make_pair_source(cfg.data, teacher.tokenizer, teacher.preprocess)
    width = teacher.model.encode_text(teacher.tokenizer(["x"]).to(device)).shape[-1]
    meta = CacheMeta(
        fingerprint=teacher_fingerprint(
            teacher.model_id, teacher.weights_hash(), teacher.preprocess, data_id(cfg)
        ),
        model_id=teacher.model_id,
        data_id=data_id(cfg),
        num_samples=len(source),
        image_dim=teacher.embed_dim,
        text_dim=int(width),
        shard_size=cfg.embed.shard_size,
    )
    folder = cache_dir(cfg)
    if isinstance(source, ShardPairs):
        check_manifest(folder, source.index)
    report = build_cache(folder, meta, teacher.model, source, cfg.embed.batch_size, device)
    cache = TeacherCache(folder)
    if isinstance(source, ShardPairs) and dist_info.is_main:
        save_manifest(folder, source.index, cache.valid)
    report |= {
        "num_samples": len(cache),
        "valid_samples": int(cache.valid.sum()),
        "skipped_total": int((~cache.valid).sum()),
        "fingerprint": meta.fingerprint,
    }
    if dist_info.is_main:
        write_json(Path(folder) / "report.json", report)
    return report
