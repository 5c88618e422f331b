"""Shared by the CLIP-CID tests: a tiny real teacher cache, built once per test module."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from clipdistill.config import RunConfig, load_config
from clipdistill.embed import run_embed
from conftest import tiny_overrides

# An untrained tiny teacher puts most images above cosine 0.98, so these keep the passes meaningful.
STAGE_ARGS = (
    "--teacher.pretrained", "", "--data.val_size", "64", "--embed.shard_size", "100",
    "--balance.n_clusters", "8", "--balance.tau_p", "0.99995", "--cluster.n_clusters", "8",
)  # fmt: skip


def build_tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 256-row teacher cache built by the shipped tiny model (tests copy it): for a module fixture."""
    run_dir = tmp_path_factory.mktemp("cache_run")
    run_embed(load_config(None, tiny_overrides(run_dir, *STAGE_ARGS)))
    return run_dir / "cache"


def stage_config(tiny_cache, run_dir, *extra: str) -> RunConfig:
    """The tiny run config in `run_dir`, with a copy of the cache there."""
    shutil.copytree(tiny_cache, run_dir / "cache")
    return load_config(None, tiny_overrides(run_dir, *STAGE_ARGS, *extra))
