import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipdistill.cache import CacheMismatchError, TeacherCache
from clipdistill.checkpoint import read_json, save_state_dict
from clipdistill.cli import main
from clipdistill.config import ConfigError, ModelConfig, load_config
from clipdistill.data.sources import make_pair_source
from clipdistill.embed import run_embed
from clipdistill.models.factory import create_model, create_teacher
from clipdistill.runs import cache_dir, data_id
from conftest import kill_embed_after_a_shard, pairs_overrides, run_cli, write_pairs

NUM_SHARDS = 8  # 512 generated pairs in shards of 64


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    """A fixed tiny stand-in teacher (a trained teacher's model.safetensors)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "model.safetensors"
    save_state_dict(create_model(ModelConfig(name="lab-student-tiny")).model.state_dict(), path)
    return str(path)


def _args(run_dir, pairs, teacher_weights, *extra):
    return pairs_overrides(run_dir, pairs, "--teacher.pretrained", teacher_weights, *extra)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs"), 512)


@pytest.fixture(scope="module")
def built(tmp_path_factory, pairs, teacher_weights):
    """An uninterrupted cache, built in this process."""
    cfg = load_config(None, _args(tmp_path_factory.mktemp("uninterrupted"), pairs, teacher_weights))
    report = run_embed(cfg)
    return cfg, report


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "report.json"}


def test_report(built):
    cfg, report = built
    assert report["num_samples"] == report["valid_samples"] == 512
    assert report["shards_computed"] == NUM_SHARDS and report["skipped_total"] == 0
    shards = {name for s in range(NUM_SHARDS) for name in (f"emb_{s:05d}.npy", f"shard_{s:05d}.json")}
    assert set(_files(cache_dir(cfg))) == {"meta.json", "valid.npy", "teacher.json"} | shards


def test_the_teachers_own_logit_scale_is_recorded_and_added_to_an_older_cache(built, teacher_weights):
    cfg, _ = built
    own = float(create_teacher(cfg.teacher).model.logit_scale.exp())
    cache = TeacherCache(cache_dir(cfg))
    assert cache.logit_scale == pytest.approx(own)
    (cache.folder / "teacher.json").unlink()  # a cache built before the file existed
    assert TeacherCache(cache_dir(cfg)).logit_scale is None
    built = read_json(cache_dir(cfg) / "report.json")["seconds"]
    rerun = run_embed(cfg)
    assert rerun["shards_computed"] == 0  # nothing recomputed, the record written again
    assert TeacherCache(cache_dir(cfg)).logit_scale == pytest.approx(own)
    assert built <= rerun["seconds"] < built + 1  # the report keeps the build's time


@pytest.mark.slow
def test_kill_9_then_rerun_is_byte_identical(tmp_path, built, pairs, teacher_weights):
    cfg, _ = built
    args = _args(tmp_path / "killed", pairs, teacher_weights)
    folder = tmp_path / "killed" / "cache"
    done = kill_embed_after_a_shard(args, folder, shard_delay=0.25)
    assert 1 <= done < NUM_SHARDS
    with pytest.raises(FileNotFoundError, match="incomplete"):
        TeacherCache(folder)

    rerun = run_cli(["embed", *args], timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f'"shards_computed": {NUM_SHARDS - done}' in rerun.stdout
    assert _files(folder) == _files(cache_dir(cfg))


@pytest.mark.slow
def test_a_second_embed_of_a_running_cache_is_refused_and_the_first_resumes(
    tmp_path, built, pairs, teacher_weights, capsys
):
    """The same command started twice: the second says who is writing the cache and leaves the first
    one's files alone (its sweep would delete the half-written shard of a running build)."""
    cfg, _ = built
    args = _args(tmp_path / "twice", pairs, teacher_weights)
    folder = tmp_path / "twice" / "cache"
    refusals = []

    def second_command(first: subprocess.Popen) -> None:
        half_written = folder / ".emb_00007.npy.first.tmp"  # as the first one's next write would be
        half_written.write_bytes(b"half")
        refusals.append(main(["embed", *args]))
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"is being written by pid {first.pid}" in err, err
        assert half_written.exists()  # not swept
        assert (tmp_path / "twice" / ".cache.lock").read_text().startswith(f"pid {first.pid} ")

    done = kill_embed_after_a_shard(args, folder, shard_delay=0.25, while_running=second_command)
    assert refusals == [1] and 1 <= done < NUM_SHARDS
    rerun = run_cli(["embed", *args], timeout=120)  # the killed holder's lock went with it
    assert rerun.returncode == 0, rerun.stderr
    assert _files(folder) == _files(cache_dir(cfg))
    assert not (tmp_path / "twice" / ".cache.lock").exists()


def test_rows_across_shards_in_order(built):
    cfg, _ = built
    cache = TeacherCache(cache_dir(cfg))
    full = np.concatenate([np.load(p) for p in sorted(cache_dir(cfg).glob("emb_*.npy"))]).astype(np.float32)
    index = np.array([511, 0, 63, 64, 65, 200, 63, 448, 1])  # unsorted, repeated, shard edges
    image, text = cache.rows(index)
    assert image.dtype == text.dtype == torch.float32
    assert image.shape == (len(index), 32) and text.shape == (len(index), 32)
    assert torch.equal(torch.cat([image, text], 1), torch.from_numpy(full[index]))
    assert torch.allclose(image.norm(dim=1), torch.ones(len(index)), atol=2e-3)

    # row i is the teacher's embedding of sample i (image and caption)
    teacher = create_teacher(cfg.teacher)
    (batch,) = make_pair_source(cfg.data, teacher.tokenizer, teacher.preprocess).batches([index])
    with torch.no_grad():
        expected_image = F.normalize(teacher.model.encode_image(batch["image"]), dim=-1)
        expected_text = F.normalize(teacher.model.encode_text(batch["text"]), dim=-1)
    torch.testing.assert_close(image, expected_image, atol=2e-3, rtol=0)
    torch.testing.assert_close(text, expected_text, atol=2e-3, rtol=0)


def test_fp16_and_memory_mapped(built):
    cfg, _ = built
    cache = TeacherCache(cache_dir(cfg))
    assert len(cache) == 512 and cache.valid.all()
    for shard in cache._shards:
        assert isinstance(shard, np.memmap) and shard.dtype == np.float16 and shard.shape == (64, 64)
    assert sum(a.shape[0] for a in cache.all_image()) == 512


def test_other_teacher_or_settings_are_refused(tmp_path, built):
    cfg, _ = built
    other_teacher = load_config(None, _args(cfg.run_dir, cfg.data.path, str(tmp_path / "t.safetensors")))
    torch.manual_seed(1)
    save_state_dict(create_model(other_teacher.student).model.state_dict(), tmp_path / "t.safetensors")
    with pytest.raises(CacheMismatchError, match=f"Delete {cache_dir(cfg)}"):
        run_embed(other_teacher)

    with pytest.raises(CacheMismatchError, match=r"other settings \(shard size 64 -> 128\)"):
        other_shards = _args(cfg.run_dir, cfg.data.path, cfg.teacher.pretrained, "--embed.shard_size", "128")
        run_embed(load_config(None, other_shards))

    cache = TeacherCache(cache_dir(cfg))
    cache.check(data_id(cfg))
    other = tmp_path / "other.csv"
    other.write_text(Path(cfg.data.path).read_text().replace(",a ", ",one ", 1))
    with pytest.raises(CacheMismatchError, match="was built from data"):
        cache.check(data_id(load_config(None, _args(cfg.run_dir, other, "x"))))
    with pytest.raises(CacheMismatchError, match="not the configured one"):
        cache.check(data_id(cfg), fingerprint="0123456789abcdef")
    other_column = load_config(None, _args(cfg.run_dir, cfg.data.path, "x", "--data.caption_key", "filepath"))
    with pytest.raises(CacheMismatchError, match="was built from data"):  # the captions of another column
        cache.check(data_id(other_column))
    lab_only = load_config(None, _args(cfg.run_dir, cfg.data.path, "x", "--data.val_size", "7"))
    cache.check(data_id(lab_only))  # the lab's split sizes are not a table's: the same data


def test_an_edited_table_is_new_data_and_a_moved_one_is_not(tmp_path, built):
    """The cache is keyed on the table's contents: same path, edited caption -> refused, not reused."""
    cfg, _ = built
    moved = tmp_path / "elsewhere" / "pairs.csv"
    moved.parent.mkdir()
    moved.write_bytes(Path(cfg.data.path).read_bytes())
    TeacherCache(cache_dir(cfg)).check(data_id(load_config(None, _args(cfg.run_dir, moved, "x"))))

    run_dir = tmp_path / "run"
    table = tmp_path / "table.csv"
    table.write_bytes(Path(cfg.data.path).read_bytes())
    args = _args(run_dir, table, cfg.teacher.pretrained, "--embed.shard_size", "256")
    run_embed(load_config(None, args))
    lines = table.read_text().splitlines(keepends=True)
    table.write_text("".join([*lines[:-1], lines[-1].replace(",a ", ",an old ")]))
    with pytest.raises(CacheMismatchError, match="data csv:sha256-"):
        run_embed(load_config(None, args))
    with pytest.raises(ConfigError, match="missing.csv' does not exist: give the CSV"):
        data_id(load_config(None, _args(run_dir, tmp_path / "missing.csv", "x")))
