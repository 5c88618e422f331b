"""Shared by the distillation tests: a tiny real teacher cache, built once per test module."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from clipdistill.config import RunConfig, load_config
from clipdistill.embed import run_embed
from conftest import pairs_overrides, tiny_overrides, write_pairs

# An untrained tiny teacher puts most images above cosine 0.98, so these keep the passes meaningful.
STAGE_ARGS = (
    "--data.val_size", "64", "--embed.shard_size", "100",
    "--balance.n_clusters", "8", "--balance.tau_p", "0.99995", "--cluster.n_clusters", "8",
)  # fmt: skip


def build_tiny_cache(tmp_path_factory: pytest.TempPathFactory, lab: bool = False) -> Path:
    """A 256-row teacher cache built by the shipped tiny model (tests copy it): for a module fixture.

    Of 256 generated pairs, written next to the cache, or with `lab` of the Fashion-MNIST lab (whose
    classes ComKD's stage 1 learns)."""
    run_dir = tmp_path_factory.mktemp("cache_run")
    if not lab:
        write_pairs(run_dir / "pairs", 256)
    run_embed(load_config(None, stage_args(run_dir / "cache", run_dir)))
    return run_dir / "cache"


def stage_args(tiny_cache: Path, run_dir: Path, *extra: str) -> list[str]:
    """The tiny run's overrides in `run_dir`, on the data `tiny_cache` is built from."""
    pairs = tiny_cache.parent / "pairs" / "pairs.csv"
    if pairs.is_file():
        return pairs_overrides(run_dir, pairs, *STAGE_ARGS, *extra)
    return tiny_overrides(run_dir, *STAGE_ARGS, *extra)


def stage_config(tiny_cache: Path, run_dir: Path, *extra: str) -> RunConfig:
    """The tiny run config in `run_dir`, with a copy of the cache there."""
    shutil.copytree(tiny_cache, run_dir / "cache")
    return load_config(None, stage_args(tiny_cache, run_dir, *extra))
