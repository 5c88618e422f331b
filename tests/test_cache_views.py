"""The reinforced cache (`embed --embed.views N`): a one-view cache is today's, byte for byte; an N-view
cache holds every view's crop and flip and the teacher's embedding of exactly that view, and a killed
multi-view embed resumes to the same bytes."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipdistill.cache import CacheMismatchError, TeacherCache
from clipdistill.checkpoint import read_json, save_state_dict
from clipdistill.config import ConfigError, ModelConfig, load_config
from clipdistill.data.sources import make_pair_source
from clipdistill.data.views import apply_views, view_params
from clipdistill.embed import run_embed
from clipdistill.models.factory import create_model, create_teacher
from clipdistill.runs import cache_dir, data_id
from conftest import kill_embed_after_a_shard, pairs_overrides, run_cli, write_pairs

NUM_SHARDS = 4  # 256 generated pairs in shards of 64
VIEWS = ("--embed.views", "3", "--embed.view_min_scale", "0.4", "--embed.view_seed", "5")
OLD_META_KEYS = {"fingerprint", "model_id", "data_id", "num_samples", "image_dim", "text_dim", "shard_size"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    pairs = write_pairs(root / "pairs", 256)
    torch.manual_seed(0)
    weights = root / "teacher.safetensors"
    save_state_dict(create_model(ModelConfig(name="lab-student-tiny")).model.state_dict(), weights)
    return root, pairs, str(weights)


def _args(setup, run_dir, *extra):
    _, pairs, weights = setup
    return pairs_overrides(run_dir, pairs, "--teacher.pretrained", weights, *extra)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "report.json"}


@pytest.fixture(scope="module")
def plain(setup):
    cfg = load_config(None, _args(setup, setup[0] / "plain"))
    return cfg, run_embed(cfg)


@pytest.fixture(scope="module")
def views(setup):
    cfg = load_config(None, _args(setup, setup[0] / "views", *VIEWS))
    return cfg, run_embed(cfg)


def test_one_view_is_todays_cache_byte_for_byte(setup, plain):
    cfg, report = plain
    # the option spelled out, with view settings that a single view never reads
    spelled = ("--embed.views", "1", "--embed.view_min_scale", "0.2", "--embed.view_seed", "9")
    explicit = load_config(None, _args(setup, setup[0] / "explicit", *spelled))
    assert cache_dir(explicit) == setup[0] / "explicit" / "cache"
    assert run_embed(explicit)["fingerprint"] == report["fingerprint"]
    assert _files(cache_dir(explicit)) == _files(cache_dir(cfg))
    meta = read_json(cache_dir(cfg) / "meta.json")
    assert set(meta) == OLD_META_KEYS
    assert not list(cache_dir(cfg).glob("views_*")) and not list(cache_dir(cfg).glob("aug_*"))
    # the fingerprint is the formula it always was: the teacher, its weights, preprocessing and data
    teacher = create_teacher(cfg.teacher)
    blob = json.dumps([teacher.model_id, teacher.weights_hash(), repr(teacher.preprocess), data_id(cfg)])
    assert meta["fingerprint"] == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert report["views"] == 1 and report["disk_bytes"] > 0


def test_views_cache_layout_and_fingerprint(plain, views):
    cfg, report = views
    folder = cache_dir(cfg)
    assert folder.name == "cache_views3"
    names = set(_files(folder))
    for s in range(NUM_SHARDS):
        assert {f"emb_{s:05d}.npy", f"views_{s:05d}.npy", f"aug_{s:05d}.npy", f"shard_{s:05d}.json"} <= names
    meta = read_json(folder / "meta.json")
    assert (meta["views"], meta["view_seed"], meta["view_min_scale"]) == (3, 5, 0.4)
    assert report["fingerprint"] != plain[1]["fingerprint"]
    # view 0 is the plain cache: the same embeddings, same bytes
    for s in range(NUM_SHARDS):
        name = f"emb_{s:05d}.npy"
        assert (folder / name).read_bytes() == (cache_dir(plain[0]) / name).read_bytes()
    cache = TeacherCache(folder)
    assert np.load(folder / "views_00000.npy", mmap_mode="r").shape == (64, 2, 32)
    # the extra disk: (N - 1) float16 image embeddings and N float32 parameter sets per row
    extra = [np.load(f, mmap_mode="r") for f in sorted(folder.glob("views_*")) + sorted(folder.glob("aug_*"))]
    assert sum(a.nbytes for a in extra) == 256 * (2 * 32 * 2 + 3 * 5 * 4)
    assert report["disk_bytes"] == sum(len(b) for b in _files(folder).values())
    assert cache.meta.views == 3


def test_each_view_holds_the_teachers_embedding_of_exactly_that_view(views):
    cfg, _ = views
    cache = TeacherCache(cache_dir(cfg))
    rows = np.array([0, 5, 63, 64, 130, 255])
    params = view_params(5, rows, 3, 0.4)
    teacher = create_teacher(cfg.teacher)
    (batch,) = make_pair_source(cfg.data, teacher.tokenizer, teacher.preprocess).batches([rows])
    plain_image, plain_text = cache.rows(rows)
    for v in range(3):
        image, text, got = cache.view_rows(rows, np.full(len(rows), v))
        np.testing.assert_array_equal(got.numpy(), params[:, v])  # the stored parameters
        assert torch.equal(text, plain_text)
        with torch.no_grad():
            seen = teacher.model.encode_image(apply_views(batch["image"], torch.from_numpy(params[:, v])))
        torch.testing.assert_close(image, F.normalize(seen, dim=-1), atol=2e-3, rtol=0)
        if v == 0:
            assert torch.equal(image, plain_image)
        else:
            assert (image - plain_image).abs().max() > 0.01  # another view, another embedding
    mixed = np.array([2, 0, 1, 2, 1, 0])
    image, _, got = cache.view_rows(rows, mixed)
    for i, v in enumerate(mixed):
        one, _, p = cache.view_rows(rows[i : i + 1], np.array([v]))
        assert torch.equal(image[i], one[0]) and torch.equal(got[i], p[0])
    with pytest.raises(ValueError, match="views must be in 0..2"):
        cache.view_rows(rows[:1], np.array([3]))


def test_other_view_settings_are_refused_and_bad_ones_stop_before_work(setup, views):
    cfg, _ = views
    other_seed = [*VIEWS[:-1], "6"]
    with pytest.raises(CacheMismatchError, match="Delete"):
        run_embed(load_config(None, _args(setup, cfg.run_dir, *other_seed)))
    with pytest.raises(ConfigError, match="embed.views must be at least 1"):
        run_embed(load_config(None, _args(setup, setup[0] / "bad", "--embed.views", "0")))
    with pytest.raises(ConfigError, match="embed.view_min_scale must be above 0, not 0.0"):
        load_config(None, _args(setup, setup[0] / "bad", "--embed.views", "2", "--embed.view_min_scale", "0"))
    assert not (setup[0] / "bad").exists()


@pytest.mark.slow
def test_kill_9_then_rerun_of_a_views_cache_is_byte_identical(setup, views, tmp_path):
    cfg, _ = views
    args = _args(setup, tmp_path / "killed", *VIEWS)
    folder = tmp_path / "killed" / "cache_views3"
    done = kill_embed_after_a_shard(args, folder, shard_delay=0.4)
    assert 1 <= done < NUM_SHARDS
    rerun = run_cli(["embed", *args], timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f'"shards_computed": {NUM_SHARDS - done}' in rerun.stdout
    assert _files(folder) == _files(cache_dir(cfg))


def test_a_views_cache_next_to_the_plain_one_computes_only_the_views(setup, plain, views, monkeypatch):
    """The plain cache of the same teacher gives view 0 and the captions: the same bytes, and the
    teacher's text tower runs once (the width probe at start-up), not per batch."""
    from open_clip.model import CLIP, CustomTextCLIP

    calls = []
    for cls in (CLIP, CustomTextCLIP):
        original = cls.encode_text
        monkeypatch.setattr(
            cls, "encode_text", lambda self, *a, f=original, **k: calls.append(1) or f(self, *a, **k)
        )
    report = run_embed(load_config(None, _args(setup, plain[0].run_dir, *VIEWS)))
    assert len(calls) == 1
    assert report["reused_plain_cache"] and not views[1]["reused_plain_cache"]
    assert _files(Path(plain[0].run_dir) / "cache_views3") == _files(cache_dir(views[0]))
