"""The run folder the suite measures in: the lab's config and models on a slice of Fashion-MNIST,
with a real teacher cache, k-means clusters and a stage-1 prompt teacher (what CID and ComKD read).

The teacher's image tower is untrained (`--teacher.pretrained ""`): speed does not depend on weights,
and the suite then needs no earlier `make demo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from clipdistill.config import RunConfig, load_config, replace
from clipdistill.curate.stages import run_cluster
from clipdistill.embed import run_embed
from clipdistill.lab import LAB_CONFIG
from clipdistill.train import train


@dataclass
class Setting:
    """The models and sizes measured: the lab's (full run) or tiny ones (--quick)."""

    student: str = "lab-student"
    teacher: str = "lab-teacher"
    batch_size: int = 128
    train_size: int = 4096
    n_clusters: int = 100


QUICK = Setting(
    student="lab-student-tiny", teacher="lab-student-tiny", batch_size=32, train_size=512, n_clusters=8
)


def lab_overrides(run_dir: Path, setting: Setting, *extra: str) -> list[str]:
    """Command-line overrides of configs/lab.yaml for a run in `run_dir` (also shown in printed commands)."""
    lock = "true" if setting.teacher == "lab-teacher" else "false"
    return [
        "--run_dir", str(run_dir),
        "--teacher.name", setting.teacher, "--teacher.pretrained", "", "--teacher.lock_text", lock,
        "--student.name", setting.student,
        "--data.train_size", str(setting.train_size),
        "--train.batch_size", str(setting.batch_size), "--train.device", "cpu",
        "--embed.device", "cpu", "--embed.shard_size", "2048",
        "--cluster.n_clusters", str(setting.n_clusters),
        *extra,
    ]  # fmt: skip


def lab_config(run_dir: Path, setting: Setting, *extra: str) -> RunConfig:
    return load_config(str(LAB_CONFIG), lab_overrides(run_dir, setting, *extra))


def build_run(run_dir: Path, setting: Setting) -> RunConfig:
    """embed -> cluster -> 1 step of prompt tuning in `run_dir`; each stage reuses its finished outputs."""
    cfg = lab_config(run_dir, setting)
    torch.manual_seed(0)  # the untrained teacher's weights are part of the cache's fingerprint
    run_embed(cfg)
    run_cluster(cfg)
    stage1 = {"train.method": "prompt_teacher", "train.role": "teacher", "train.steps": 1,
              "train.batch_size": min(32, setting.batch_size)}  # fmt: skip
    train(replace(cfg, stage1))
    return cfg
