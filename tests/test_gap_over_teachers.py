"""benchmarks/gap_over_teachers.py: where each teacher draw comes from and distils."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repo root

import benchmarks.gap_over_teachers as gap  # noqa: E402

from clipdistill.config import load_config  # noqa: E402
from clipdistill.lab import LAB_CONFIG  # noqa: E402


def test_seed_0_is_the_bench_teacher_and_other_seeds_distil_in_run_dirs_of_their_own(monkeypatch, tmp_path):
    trained = []

    def record(cfg, seed=0, name="teacher"):
        trained.append((seed, name))

    monkeypatch.setattr(gap, "train_teacher", record)
    base = load_config(str(LAB_CONFIG), ["--run_dir", str(tmp_path / "bench")])
    cfg, name = gap.teacher_config(base, 0)
    assert (cfg, name) == (base, "teacher")
    cfg, name = gap.teacher_config(base, 2)
    assert name == "teacher_seed2" and cfg.run_dir == f"{tmp_path}/bench_t2"
    assert cfg.teacher.pretrained == f"{tmp_path}/bench/teacher_seed2/model.safetensors"
    assert base.teacher.pretrained == f"{tmp_path}/bench/teacher/model.safetensors"  # the bench's, untouched
    assert trained == [(0, "teacher"), (2, "teacher_seed2")]  # each trained in the bench run dir (or reused)
