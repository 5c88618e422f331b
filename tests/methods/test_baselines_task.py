"""The distillation baselines on a tiny cache: each trains, logs finite parts, and λ=0 is plain CLIP;
unset keys take each method's origin settings, which make crd, tinyclip_affinity and openclip_distill
differ as their code does."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch

import clipdistill.train as train_module
from cid_fixtures import build_tiny_cache, stage_config
from clipdistill.config import ConfigError, DistillConfig, ModelConfig, replace, to_dict
from clipdistill.methods import needs_teacher_cache
from clipdistill.methods.baselines import BASELINES, BaselineTask
from clipdistill.models.factory import create_student
from clipdistill.train import _fingerprinted, train
from conftest import cached_pair_batch


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
    origin = DistillConfig().for_method(method)  # the config leaves every distill key unset
    clip_weight, weight = (1.0, 1.0) if method == "openclip_distill" else (origin.clip_weight, origin.weight)
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("loss", "clip", "kd"))
        assert r["loss"] == pytest.approx(clip_weight * r["clip"] + weight * r["kd"], rel=1e-4)


@pytest.mark.parametrize("method", [m for m in BASELINES if m != "openclip_distill"])
def test_zero_weight_leaves_the_clip_loss(method, tiny_cache, tmp_path):
    cfg = stage_config(
        tiny_cache, tmp_path / "run", "--train.method", method, "--train.steps", "1", "--distill.weight", "0",
        "--distill.clip_weight", "1",  # TinyCLIP's origin drops the CLIP loss
    )  # fmt: skip
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


def test_teacher_logit_scale_is_the_teachers_own_unless_set(tiny_cache, tmp_path):
    """crd and openclip_distill scale the teacher's similarities by its own learnt scale, recorded by
    `embed`, as CLIP-KD's and open_clip's code do; a set value wins; a cache recording none is refused
    where a loss reads it, and only there."""
    from clipdistill.cache import TeacherCache
    from clipdistill.methods import build_task
    from clipdistill.models.factory import create_teacher

    cfg = stage_config(tiny_cache, tmp_path / "run")
    cache = TeacherCache(tmp_path / "run" / "cache")
    own = float(create_teacher(cfg.teacher).model.logit_scale.exp())
    assert cache.logit_scale == pytest.approx(own) and own != 100.0
    model = create_student(cfg.student).model

    def scale(method: str, *overrides) -> float:
        task = build_task(replace(cfg, {"train.method": method, **dict(overrides)}), model, cache)
        return float(task.teacher_logit_scale)

    assert scale("crd") == scale("openclip_distill") == pytest.approx(own)
    assert scale("tinyclip_affinity", ("distill.affinity_logit_scale", 0.0)) == pytest.approx(own)
    assert scale("crd", ("distill.teacher_logit_scale", 30.0)) == 30.0
    shutil.copytree(cache.folder, tmp_path / "none")
    (tmp_path / "none" / "teacher.json").write_text('{"logit_scale": null}')
    cache = TeacherCache(tmp_path / "none")
    assert cache.logit_scale is None
    with pytest.raises(ConfigError, match="records none"):
        scale("crd")
    scale("fd"), scale("tinyclip_affinity")  # no term reads it: no need to ask


def test_unset_keys_take_each_origin_and_a_set_key_wins():
    assert DistillConfig().for_method("fd").weight == 2000.0  # CLIP-KD's FD.sh
    crd, icl = DistillConfig().for_method("crd"), DistillConfig().for_method("icl")
    assert (crd.weight, crd.crd_temperature, crd.clip_weight, crd.icl_own_scale) == (1.0, 1.0, 1.0, False)
    assert icl.icl_own_scale is True and icl.weight == 1.0
    tiny = DistillConfig().for_method("tinyclip_affinity")
    assert (tiny.clip_weight, tiny.affinity_logit_scale) == (0.0, 50.0)  # TinyCLIP: alpha 1, --logit-scale 50
    given = DistillConfig(weight=3.0, clip_weight=1.0, affinity_logit_scale=0.0)
    set_ = given.for_method("tinyclip_affinity")
    assert (set_.weight, set_.clip_weight, set_.affinity_logit_scale) == (3.0, 1.0, 0.0)


def test_fingerprint_is_what_trains(pairs_config):
    """An unset key and its origin value are one run; runs from before the origin defaults (weight 1, no
    newer keys) still match the same settings given explicitly."""

    def key(*args):
        return _fingerprinted(to_dict(pairs_config(*args)))

    assert key("--train.method", "fd") == key("--train.method", "fd", "--distill.weight", "2000")
    assert key("--train.method", "fd") != key("--train.method", "fd", "--distill.weight", "1")
    older = {"weight": 1.0, "teacher_logit_scale": 100.0, "crd_temperature": 1.0}  # how they were keyed
    at_100 = ("--distill.teacher_logit_scale", "100")
    assert key("--train.method", "crd", *at_100)["distill"] == older
    assert key("--train.method", "crd")["distill"] != older  # now the teacher's own scale
    icl = key("--train.method", "icl", "--distill.icl_own_scale", "false")["distill"]
    assert icl == older  # never read by icl: pinned at the 100 those runs recorded
    shared = ("--distill.clip_weight", "1", "--distill.affinity_logit_scale", "0", *at_100)
    assert key("--train.method", "tinyclip_affinity", *shared)["distill"] == older
    assert key("--train.method", "tinyclip_affinity")["distill"] != older
    # a key no term reads leaves the run as it was: TinyCLIP at its own fixed scale
    fixed = ("--train.method", "tinyclip_affinity", "--distill.affinity_logit_scale", "25")
    assert key(*fixed) == key(*fixed, "--distill.teacher_logit_scale", "30")
    assert key(*fixed)["distill"]["teacher_logit_scale"] == 100.0  # as the runs before the own-scale default


def _gradient(kind: str, cfg: DistillConfig) -> torch.Tensor:
    torch.manual_seed(0)
    task = BaselineTask(create_student(ModelConfig(name="lab-student-tiny")).model, kind, 16, cfg)
    batch = cached_pair_batch()
    task(batch)["loss"].backward()
    return torch.cat([p.grad.flatten() for p in task.model.visual.parameters() if p.grad is not None])


def test_crd_tinyclip_and_openclip_differ_at_their_origins_as_their_code_does():
    origin = DistillConfig()
    crd = _gradient("crd", origin)
    # open_clip's DistillClipLoss is CLIP-KD's CRD at T = 1 (soft cross-entropy = KL + the teacher's
    # entropy): one gradient; the docs show it once
    torch.testing.assert_close(_gradient("openclip_distill", origin), crd, rtol=1e-4, atol=1e-7)
    tiny = _gradient("tinyclip_affinity", origin)  # no CLIP loss, both scales fixed at 50
    assert not torch.allclose(tiny, crd, rtol=1e-2, atol=1e-6)
    shared = DistillConfig(clip_weight=1.0, affinity_logit_scale=0.0)  # the older shared setting: as crd
    torch.testing.assert_close(_gradient("tinyclip_affinity", shared), crd, rtol=1e-4, atol=1e-7)


def test_an_unread_student_scale_is_frozen():
    model = create_student(ModelConfig(name="lab-student-tiny")).model
    tiny = BaselineTask(copy.deepcopy(model), "tinyclip_affinity", 16, DistillConfig())
    assert not tiny.model.logit_scale.requires_grad
    crd = BaselineTask(copy.deepcopy(model), "crd", 16, DistillConfig())
    assert crd.model.logit_scale.requires_grad
