"""CLIP-CID training on a tiny cache: parts logged, ablations, teacher never in the loop."""

from __future__ import annotations

import json
import math

import pytest

import clipdistill.train as train_module
from cid_fixtures import build_tiny_cache, stage_config
from clipdistill.config import ConfigError
from clipdistill.curate.stages import run_balance, run_cluster
from clipdistill.train import train


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory)


def _metrics(run_dir, name):
    return [json.loads(line) for line in (run_dir / name / "metrics.jsonl").read_text().splitlines()]


def test_cid_trains_from_the_cache_alone(tiny_cache, tmp_path, monkeypatch):
    cfg = stage_config(
        tiny_cache, tmp_path / "run", "--train.method", "cid", "--train.steps", "3",
        "--balance.keep_ratio", "0.5", "--cluster.subset", "balance/kept.npy",
    )  # fmt: skip
    run_balance(cfg)
    run_cluster(cfg)  # half the rows get no cluster: L_cd leaves them out

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher must not be built while training cid")

    monkeypatch.setattr(train_module, "create_teacher", no_teacher)
    done = train(cfg)
    assert done["steps"] == 3
    records = _metrics(tmp_path / "run", "cid")
    assert len(records) == 3
    for r in records:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("loss", "clip", "cd", "id"))
        assert r["loss"] == pytest.approx(r["clip"] + r["cd"] + r["id"], rel=1e-4)


def test_zero_lambdas_leave_the_clip_loss(tiny_cache, tmp_path):
    cfg = stage_config(
        tiny_cache, tmp_path / "run", "--train.method", "cid", "--train.steps", "2",
        "--cid.lambda_cd", "0", "--cid.lambda_id", "0",
    )  # fmt: skip
    run_cluster(cfg)
    train(cfg)
    for r in _metrics(tmp_path / "run", "cid"):
        assert r["loss"] == pytest.approx(r["clip"]) and r["cd"] == r["id"] == 0.0


def test_the_relational_term_is_added_on_request_and_off_by_default(tiny_cache, tmp_path):
    from clipdistill.config import to_dict
    from clipdistill.train import _fingerprinted

    cfg = stage_config(
        tiny_cache, tmp_path / "run", "--train.method", "cid", "--train.steps", "2", "--cid.lambda_rd", "0.5",
    )  # fmt: skip
    run_cluster(cfg)
    train(cfg)
    for r in _metrics(tmp_path / "run", "cid"):
        assert math.isfinite(r["rd"]) and r["rd"] > 0
        assert r["loss"] == pytest.approx(r["clip"] + r["cd"] + r["id"] + 0.5 * r["rd"], rel=1e-4)
    default = stage_config(tiny_cache, tmp_path / "other", "--train.method", "cid")
    assert "lambda_rd" not in _fingerprinted(to_dict(default))["cid"]  # runs from before the key still match
    assert "lambda_rd" in _fingerprinted(to_dict(cfg))["cid"]
    assert "rd_teacher_logit_scale" not in _fingerprinted(to_dict(cfg))["cid"]  # 100, as those runs had


def test_the_relational_terms_teacher_scale_is_100_or_the_teachers_own(tiny_cache, tmp_path):
    from clipdistill.cache import TeacherCache
    from clipdistill.config import replace
    from clipdistill.methods import build_task
    from clipdistill.models.factory import create_student

    cfg = stage_config(tiny_cache, tmp_path / "run", "--train.method", "cid", "--cid.lambda_rd", "1")
    run_cluster(cfg)
    cache = TeacherCache(tmp_path / "run" / "cache")
    model = create_student(cfg.student).model
    assert float(build_task(cfg, model, cache).teacher_logit_scale) == 100.0
    own = replace(cfg, {"cid.rd_teacher_logit_scale": 0.0})
    assert float(build_task(own, model, cache).teacher_logit_scale) == pytest.approx(cache.logit_scale)
    assert cache.logit_scale != 100.0


def test_task_holds_no_teacher_and_needs_clusters(tiny_cache, tmp_path):
    from clipdistill.cache import TeacherCache
    from clipdistill.methods import build_task, needs_teacher_cache
    from clipdistill.models.factory import create_student

    cfg = stage_config(tiny_cache, tmp_path / "run", "--train.method", "cid")
    cache = TeacherCache(tmp_path / "run" / "cache")
    model = create_student(cfg.student).model
    assert needs_teacher_cache("cid")
    with pytest.raises(ConfigError, match="clipdistill cluster"):
        build_task(cfg, model, cache)
    run_cluster(cfg)
    task = build_task(cfg, model, cache)
    assert not hasattr(task, "teacher")
    assert {"proj_image", "proj_text"} <= set(task.heads())
    assert all(not name.startswith("teacher") for name, _ in task.named_modules())
    cfg.cid.lambda_cd = cfg.cid.lambda_id = 0.0
    assert build_task(cfg, model, cache).heads() == {}


def test_demo_rows_set_dotted_overrides():
    from clipdistill.config import ConfigError, RunConfig, replace
    from clipdistill.lab import row_config
    from clipdistill.lab.demo import _needs_clusters

    cfg = row_config(RunConfig(), "cid_no_cluster", seed=0)
    assert cfg.train.method == "cid" and cfg.cid.lambda_cd == 0.0 and RunConfig().cid.lambda_cd == 1.0
    assert cfg.train.name == "cid_no_cluster" and cfg.train.role == "student"
    assert row_config(RunConfig(), "cid_balanced", seed=0).train.subset == "balance/kept.npy"
    seeded = replace(RunConfig(), {"lab.seeds": [0, 1]})
    assert row_config(seeded, "prompt_teacher", seed=1).train.name == "prompt_teacher_seed1"
    assert row_config(seeded, "prompt_teacher", seed=1).train.role == "teacher"  # the row's own role wins
    with pytest.raises(ConfigError, match="cid.lambda_xx: no such config key"):
        replace(RunConfig(), {"cid.lambda_xx": 0.0})
    with pytest.raises(ValueError, match="unknown lab row 'nope'"):
        row_config(RunConfig(), "nope", seed=0)
    cfg.lab.rows = ["no_kd"]
    assert not _needs_clusters(cfg)
    cfg.lab.rows = ["no_kd", "cid_random_subset"]
    assert _needs_clusters(cfg)


def test_the_clip_loss_weight_scales_its_term_and_every_weight_at_0_is_refused(tiny_cache, tmp_path):
    from clipdistill.cache import TeacherCache
    from clipdistill.config import replace, to_dict
    from clipdistill.methods import build_task
    from clipdistill.models.factory import create_student
    from clipdistill.train import _fingerprinted

    weighted = ("--train.method", "cid", "--train.steps", "2", "--cid.lambda_clip", "0.5")
    cfg = stage_config(tiny_cache, tmp_path / "run", *weighted)
    run_cluster(cfg)
    train(cfg)
    for r in _metrics(tmp_path / "run", "cid"):
        assert r["clip"] > 0 and r["loss"] == pytest.approx(0.5 * r["clip"] + r["cd"] + r["id"], rel=1e-4)
    assert _fingerprinted(to_dict(cfg))["cid"]["lambda_clip"] == 0.5
    assert "lambda_clip" not in _fingerprinted(to_dict(replace(cfg, {"cid.lambda_clip": 1.0})))["cid"]
    nothing = replace(cfg, {"cid.lambda_clip": 0.0, "cid.lambda_cd": 0.0, "cid.lambda_id": 0.0})
    with pytest.raises(ConfigError, match="every loss weight at 0"):
        build_task(nothing, create_student(cfg.student).model, TeacherCache(tmp_path / "run" / "cache"))
