"""The distillation baselines on a tiny cache: each trains, logs finite parts, and λ=0 is plain CLIP."""

from __future__ import annotations

import json
import math

import pytest

import clipdistill.train as train_module
from cid_fixtures import build_tiny_cache, stage_config
from clipdistill.methods import needs_teacher_cache
from clipdistill.methods.baselines import BASELINES
from clipdistill.train import train


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory)


def _metrics(run_dir, name):
    return [json.loads(line) for line in (run_dir / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_trains_from_the_cache_alone(method, tiny_cache, tmp_path, monkeypatch):
    cfg = stage_config(tiny_cache, tmp_path / "run", "--train.method", method, "--train.steps", "2")

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher must not be built while training a baseline")

    monkeypatch.setattr(train_module, "create_teacher", no_teacher)
    assert needs_teacher_cache(method)
    assert train(cfg)["steps"] == 2
    records = _metrics(tmp_path / "run", method)
    assert len(records) == 2
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("loss", "clip", "kd"))
        assert r["loss"] == pytest.approx(r["clip"] + r["kd"], rel=1e-4)


@pytest.mark.parametrize("method", [m for m in BASELINES if m != "openclip_distill"])
def test_zero_weight_leaves_the_clip_loss(method, tiny_cache, tmp_path):
    cfg = stage_config(
        tiny_cache, tmp_path / "run", "--train.method", method, "--train.steps", "1", "--distill.weight", "0"
    )
    train(cfg)
    for r in _metrics(tmp_path / "run", method):
        assert r["loss"] == pytest.approx(r["clip"]) and math.isfinite(r["kd"])


def test_projection_heads_only_where_widths_are_compared(tiny_cache, tmp_path):
    from clipdistill.cache import TeacherCache
    from clipdistill.methods import build_task
    from clipdistill.models.factory import create_student

    cfg = stage_config(tiny_cache, tmp_path / "run")
    cache = TeacherCache(tmp_path / "run" / "cache")
    model = create_student(cfg.student).model
    for method in BASELINES:
        cfg.train.method = method
        task = build_task(cfg, model, cache)
        assert set(task.heads()) == ({"distill"} if method in ("fd", "icl") else set())
        assert float(task.teacher_logit_scale) == 100.0
