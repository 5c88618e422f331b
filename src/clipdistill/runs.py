"""Where a run's artifacts live under `run_dir`: one place for the folder rules every stage shares."""

from __future__ import annotations

from pathlib import Path

from clipdistill.config import RunConfig


def model_dir(cfg: RunConfig, name: str) -> Path:
    """The folder of train run `name` (its weights, config, heads and evaluations)."""
    return Path(cfg.run_dir) / name


def cache_dir(cfg: RunConfig) -> Path:
    """The run's teacher cache; a target domain (`data.domain`, cross-dataset distillation) has its own."""
    return Path(cfg.run_dir) / (f"cache_{cfg.data.domain}" if cfg.data.domain else "cache")


def sweep_stale_tmp(folder: Path, pattern: str = ".*.tmp") -> None:
    """Delete half-written files of a killed run (see `checkpoint.atomic_path`): never read, only garbage."""
    for stale in Path(folder).glob(pattern):
        stale.unlink(missing_ok=True)
