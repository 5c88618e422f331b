"""The `embed` stage: run the teacher once over the training data and store its embeddings."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import torch

from clipdistill.cache import (
    CacheMeta,
    CacheMismatchError,
    TeacherCache,
    build_cache,
    check_manifest,
    member_dir,
    save_manifest,
    teacher_fingerprint,
)
from clipdistill.checkpoint import read_json, write_json
from clipdistill.config import ConfigError, RunConfig
from clipdistill.data.classification import path_hint
from clipdistill.data.sources import ShardPairs, TablePairs, make_pair_source
from clipdistill.data.views import RATIO
from clipdistill.distributed import init_distributed, resolve_device
from clipdistill.models.factory import create_teacher
from clipdistill.runs import cache_dir, data_id, exclusive, run_path

EXAMPLES_PER_REASON = 5
PATHS_CHECKED = 2000  # table rows whose image path is looked up for the relative-path hint


class TooManySkipped(ValueError):
    """`embed` skipped more samples than `embed.max_skip_fraction`: the data, not a few files, is wrong."""


def run_embed(cfg: RunConfig) -> dict:
    """Build (or finish) the run's teacher cache; refuses a cache from another teacher or other data,
    and data whose samples were mostly skipped. Under torchrun the ranks share the shards
    (`build_cache`); the result is the same bytes. An ensemble's other teachers are cached first, each
    in its own folder inside the cache (one teacher in memory at a time), then teacher 0."""
    views = view_settings(cfg)  # checked before any model loads
    members = ensemble_members(cfg)
    folder = cache_dir(cfg)
    with exclusive(folder):
        device = resolve_device(cfg.embed.device)
        dist_info = init_distributed(device)
        if device.type == "cuda":
            device = torch.device("cuda", dist_info.local_rank)
        fingerprints, seconds = [], 0.0
        for k, weights in enumerate(members, start=1):
            member = dataclasses.replace(cfg.teacher, pretrained=str(weights))
            meta, report, _ = embed_teacher(cfg, member, member_dir(folder, k), device, views, [])
            fingerprints.append(meta.fingerprint)
            seconds += report["seconds"]
        earlier = read_json(folder / "report.json")["seconds"] if (folder / "report.json").is_file() else 0.0
        meta, report, source = embed_teacher(cfg, cfg.teacher, folder, device, views, fingerprints)
        cache = TeacherCache(folder)
        if isinstance(source, ShardPairs) and dist_info.is_main:
            save_manifest(folder, source.index, cache.valid)
        report |= {
            "teacher": meta.model_id,
            "num_samples": len(cache),
            "valid_samples": int(cache.valid.sum()),
            "skipped_total": int((~cache.valid).sum()),
            "fingerprint": meta.fingerprint,
            "views": meta.views,
            # the embedding time of every run that built it: a rerun on a finished cache keeps the build's
            "seconds": earlier + report["seconds"] + seconds,
            "disk_bytes": sum(
                f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != "report.json"
            ),
        }
        if members:
            report["ensemble"] = [
                TeacherCache(member_dir(folder, k)).meta.model_id for k in range(1, len(members) + 1)
            ]
        report |= skip_summary(folder, meta.num_shards)
        if dist_info.is_main:
            write_json(folder / "report.json", report)
        check_skipped(report, cfg, source)
        return report


def embed_teacher(
    cfg: RunConfig, model_cfg, folder: Path, device: torch.device, views: dict | None, members: list[str]
) -> tuple[CacheMeta, dict, object]:
    """Build (or finish) one teacher's cache in `folder`: (its meta, build_cache's report, the source)."""
    teacher = create_teacher(model_cfg, lab_data=cfg.data.kind == "lab")
    teacher.model.to(device)
    source = make_pair_source(cfg.data, teacher.tokenizer, teacher.preprocess)
    if len(source) == 0:
        raise ValueError(f"data.path {cfg.data.path} holds no sample ({cfg.data.kind}): nothing to embed")
    width = teacher.model.encode_text(teacher.tokenizer(["x"]).to(device)).shape[-1]
    data = data_id(cfg)
    meta = CacheMeta(
        fingerprint=teacher_fingerprint(
            teacher.model_id, teacher.weights_hash(), teacher.preprocess, data, views, members
        ),
        model_id=teacher.model_id,
        data_id=data,
        num_samples=len(source),
        image_dim=teacher.embed_dim,
        text_dim=int(width),
        shard_size=cfg.embed.shard_size,
        ensemble=list(members),
    )
    if views is not None:  # a one-view cache keeps the defaults: its meta.json is the one it always was
        meta.views, meta.view_seed, meta.view_min_scale = views["views"], views["seed"], views["min_scale"]
    if isinstance(source, ShardPairs):
        check_manifest(folder, source.index)
    plain = None
    if folder != plain_dir(cfg):
        plain_fingerprint = teacher_fingerprint(
            teacher.model_id, teacher.weights_hash(), teacher.preprocess, data
        )
        plain = plain_cache(plain_dir(cfg), plain_fingerprint, meta)
    report = build_cache(folder, meta, teacher.model, source, cfg.embed.batch_size, device, plain)
    report["reused_plain_cache"] = plain is not None
    return meta, report, source


def plain_dir(cfg: RunConfig) -> Path:
    """Where the run's plain (one-view, one-teacher) cache lives."""
    return cache_dir(dataclasses.replace(cfg, embed=dataclasses.replace(cfg.embed, views=1, ensemble=[])))


def plain_cache(folder: Path, fingerprint: str, meta: CacheMeta) -> TeacherCache | None:
    """The finished plain cache of this teacher, data and shard size, if there is one: a views cache or
    an ensemble copies its image and text embeddings instead of computing them again."""
    try:
        cache = TeacherCache(folder)
    except (FileNotFoundError, CacheMismatchError):
        return None
    same = (cache.meta.fingerprint, cache.meta.num_samples, cache.meta.shard_size)
    return cache if same == (fingerprint, meta.num_samples, meta.shard_size) else None


def ensemble_members(cfg: RunConfig) -> list[Path]:
    """The weight files of an ensemble's teachers 1.. (`embed.ensemble`, relative to the run dir)."""
    paths = [run_path(cfg, p) for p in cfg.embed.ensemble]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"embed.ensemble: no teacher weights at {', '.join(missing)}")
    return paths


def view_settings(cfg: RunConfig) -> dict | None:
    """What a reinforced cache's views depend on (None for the plain one-view cache)."""
    e = cfg.embed
    if e.views == 1:
        return None
    return {"views": e.views, "seed": e.view_seed, "min_scale": e.view_min_scale, "ratio": list(RATIO)}


def skip_summary(folder: Path, num_shards: int) -> dict:
    """Skipped samples per reason and the first few ids of each, from the shards' records."""
    counts: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    for s in range(num_shards):
        for reason, key in read_json(Path(folder) / f"shard_{s:05d}.json")["skipped"]:
            counts[reason] += 1
            if len(examples.setdefault(reason, [])) < EXAMPLES_PER_REASON:
                examples[reason].append(key)
    return {"skipped_by_reason": dict(counts.most_common()), "skipped_examples": examples}


def check_skipped(report: dict, cfg: RunConfig, source) -> None:
    """Stop with one line when more than `embed.max_skip_fraction` of the samples were skipped, or
    all of them whatever the fraction: a cache of nothing is never a success."""
    total, skipped = report["num_samples"], report["skipped_total"]
    if skipped < total and skipped <= cfg.embed.max_skip_fraction * total:
        return
    by_reason = report["skipped_by_reason"]
    reasons = ", ".join(
        f"{n} {reason} (e.g. {', '.join(report['skipped_examples'].get(reason, [])[:3])})"
        for reason, n in by_reason.items()
    )
    hint = relative_path_hint(source) if by_reason.get("missing_file") else ""
    if by_reason.get("missing_image") or by_reason.get("missing_caption"):
        hint += members_hint(source)
    if skipped == total:
        what, remedy = f"all {total} samples were skipped", ""
    else:
        limit = cfg.embed.max_skip_fraction
        what = f"{skipped} of {total} samples were skipped, more than embed.max_skip_fraction {limit}"
        remedy = ", or raise --embed.max_skip_fraction"
    raise TooManySkipped(
        f"{what}: {reasons or 'no sample at all'}. {hint}Fix the data and rerun (delete {cache_dir(cfg)} "
        f"first: its shards are kept){remedy}; per-reason ids are in report.json"
    )


def members_hint(source) -> str:
    """Which members of a webdataset sample were looked for."""
    if not isinstance(source, ShardPairs):
        return ""
    images, captions = (" or ".join(f".{ext}" for ext in exts) for exts in (source.images, source.captions))
    return (
        f"Images are read from {images} members (data.image_key), captions from {captions} "
        "(data.caption_key): set them to the extensions the shards hold. "
    )


def relative_path_hint(source) -> str:
    """Where a table's relative image paths were read from, and whether they exist elsewhere."""
    if not isinstance(source, TablePairs):
        return ""
    table = source.dataset
    paths = [table.images[i].as_py() or "" for i in range(min(len(table), PATHS_CHECKED))]
    return path_hint(table.root, paths)
