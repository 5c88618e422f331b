"""A teacher ensemble (`embed --embed.ensemble '[FILE]'`): each teacher's cache is the one it would have
alone, and readers get the teachers side by side, scaled so that every dot product is their mean."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from clipdistill.cache import CacheMismatchError, TeacherCache
from clipdistill.checkpoint import save_state_dict
from clipdistill.config import ConfigError, ModelConfig, load_config
from clipdistill.embed import run_embed
from clipdistill.models.factory import create_model
from clipdistill.runs import cache_dir, model_dir
from clipdistill.train import train
from conftest import pairs_overrides, write_pairs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    pairs = write_pairs(root / "pairs", 128)
    weights = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = root / f"teacher{seed}.safetensors"
        save_state_dict(create_model(ModelConfig(name="lab-student-tiny")).model.state_dict(), path)
        weights.append(str(path))
    return root, pairs, weights


def _cfg(setup, name, teacher, *extra):
    root, pairs, _ = setup
    return load_config(None, pairs_overrides(root / name, pairs, "--teacher.pretrained", teacher, *extra))


def _files(folder):
    return {
        p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "report.json"
    }


@pytest.fixture(scope="module")
def caches(setup):
    _, _, (w0, w1) = setup
    alone = [_cfg(setup, f"alone{k}", w) for k, w in enumerate((w0, w1))]
    for cfg in alone:
        run_embed(cfg)
    both = _cfg(setup, "both", w0, "--embed.ensemble", json.dumps([w1]))
    report = run_embed(both)
    return alone, both, report


def test_each_teacher_is_cached_as_it_would_be_alone(caches):
    alone, both, report = caches
    folder = cache_dir(both)
    assert folder.name == "cache_ensemble2"
    assert _files(folder / "teacher1") == _files(cache_dir(alone[1]))  # meta.json included: same fingerprint
    alone0 = _files(cache_dir(alone[0]))
    assert {k: v for k, v in _files(folder).items() if k != "meta.json"} == {
        k: v for k, v in alone0.items() if k != "meta.json"
    }  # teacher 0's shards, as alone
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["ensemble"] == [TeacherCache(cache_dir(alone[1])).meta.fingerprint]
    assert meta["fingerprint"] != TeacherCache(cache_dir(alone[0])).meta.fingerprint
    assert report["ensemble"] == [TeacherCache(cache_dir(alone[1])).meta.model_id]
    assert report["disk_bytes"] == sum(
        p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != "report.json"
    )


def test_the_ensembles_logit_scale_is_the_teachers_mean(caches):
    alone, both, _ = caches
    scales = [TeacherCache(cache_dir(cfg)).logit_scale for cfg in alone]
    assert None not in scales
    assert TeacherCache(cache_dir(both)).logit_scale == pytest.approx(sum(scales) / 2)


def test_rows_are_the_teachers_side_by_side_with_mean_dot_products(caches):
    alone, both, _ = caches
    cache = TeacherCache(cache_dir(both))
    assert (cache.meta.image_dim, cache.meta.text_dim) == (64, 64) and cache.layout.image_dim == 32
    rows = np.array([3, 0, 127, 64, 9])
    image, text = cache.rows(rows)
    parts = [TeacherCache(cache_dir(cfg)).rows(rows) for cfg in alone]
    torch.testing.assert_close(image, torch.cat([parts[0][0], parts[1][0]], 1) / math.sqrt(2), rtol=0, atol=0)
    torch.testing.assert_close(text, torch.cat([parts[0][1], parts[1][1]], 1) / math.sqrt(2), rtol=0, atol=0)
    mean_logits = (parts[0][0] @ parts[0][1].T + parts[1][0] @ parts[1][1].T) / 2
    torch.testing.assert_close(image @ text.T, mean_logits, rtol=0, atol=1e-5)
    assert torch.allclose(image.norm(dim=1), torch.ones(len(rows)), atol=2e-3)
    assert sum(a.shape[0] for a in cache.all_image()) == 128 and next(cache.all_image()).shape[1] == 64


def test_an_ensemble_of_views_and_training_on_it(setup, caches):
    _, _, (w0, w1) = setup
    cfg = _cfg(setup, "both_views", w0, "--embed.ensemble", json.dumps([w1]), "--embed.views", "2",
               "--train.method", "fd")  # fmt: skip
    run_embed(cfg)
    cache = TeacherCache(cache_dir(cfg))
    assert cache_dir(cfg).name == "cache_views2_ensemble2"
    rows = np.arange(10)
    image, _, params = cache.view_rows(rows, np.ones(10, dtype=np.int64))
    first, _, p0 = TeacherCache(cache_dir(cfg) / "teacher1").view_rows(rows, np.ones(10, dtype=np.int64))
    torch.testing.assert_close(image[:, 32:], first / math.sqrt(2), rtol=0, atol=0)
    assert torch.equal(params, p0)  # every teacher saw the same crops
    assert train(cfg)["steps"] == 4


def test_comkd_on_an_ensemble_says_it_distils_one_prompt_tuned_teacher(setup, caches):
    """Not a shape error at the first step (stage 1) nor a width mismatch (stage 2): what to do."""
    _, both, _ = caches
    _, _, (w0, w1) = setup
    ensemble = ("--embed.ensemble", json.dumps([w1]))
    stage1 = _cfg(
        setup, "comkd", w0, *ensemble, "--train.role", "teacher", "--train.method", "prompt_teacher"
    )
    shutil.copytree(cache_dir(both), cache_dir(stage1))
    refusal = (
        "one prompt-tuned teacher.* ensemble of 2 teachers .* stage 1 and stage 2 without --embed.ensemble"
    )
    with pytest.raises(ConfigError, match=refusal):
        train(stage1)
    model_dir(stage1, "prompt_teacher").mkdir()
    np.save(model_dir(stage1, "prompt_teacher") / "text_bank.npy", np.eye(5, 32, dtype=np.float32))
    with pytest.raises(ConfigError, match=refusal):
        train(_cfg(setup, "comkd", w0, *ensemble, "--train.method", "comkd"))


def test_missing_or_replaced_teachers_are_refused(setup, caches, tmp_path):
    _, _, (w0, _) = setup
    with pytest.raises(ConfigError, match="embed.ensemble: no teacher weights at"):
        run_embed(
            _cfg(setup, "none", w0, "--embed.ensemble", json.dumps([str(tmp_path / "gone.safetensors")]))
        )
    _, both, _ = caches
    shutil.copytree(cache_dir(both), tmp_path / "copy")
    shutil.rmtree(tmp_path / "copy" / "teacher1")
    shutil.copytree(cache_dir(caches[0][0]), tmp_path / "copy" / "teacher1")  # teacher 0 in teacher 1's place
    with pytest.raises(CacheMismatchError, match="teacher 1 of the ensemble cache"):
        TeacherCache(tmp_path / "copy")
