"""WebDataset shards through `embed` (ordered stream) and `train` (shard-shuffled stream)."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from clipdistill.cache import TeacherCache
from clipdistill.checkpoint import safe_torch_load
from clipdistill.config import load_config
from clipdistill.embed import run_embed
from clipdistill.train import train
from conftest import write_shard, write_tar

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture
def shards(tmp_path):
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "000.tar", [f"s0_{i:03d}" for i in range(24)], rng, bad_key="s0_005")
    write_shard(tmp_path / "001.tar", [f"s1_{i:03d}" for i in range(24)], rng)
    return str(tmp_path / "{000..001}.tar")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A fixed stand-in teacher: `random` draws new weights (another fingerprint) on every run."""
    from clipdistill.checkpoint import save_state_dict
    from clipdistill.config import ModelConfig
    from clipdistill.models.factory import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "model.safetensors"
    save_state_dict(create_model(ModelConfig(name="lab-student-tiny")).model.state_dict(), path)
    return str(path)


def _cfg(tmp_path, shards, *extra):
    return load_config(None, [
        "--run_dir", str(tmp_path / "run"), "--data.kind", "webdataset", "--data.path", shards,
        "--teacher.name", "lab-student-tiny", "--teacher.pretrained", "random",
        "--teacher.lock_text", "false",
        "--student.name", "lab-student-tiny", "--embed.shard_size", "20", "--embed.batch_size", "8",
        *extra,
    ])  # fmt: skip


def test_embed_streams_shards_in_order_and_counts_the_bad_sample(tmp_path, shards):
    report = run_embed(_cfg(tmp_path, shards))
    cache = TeacherCache(tmp_path / "run" / "cache")
    assert len(cache) == 48
    assert report["skipped_total"] == 1 and int(cache.valid.sum()) == 47
    index, valid_counts = cache.manifest()
    assert index.counts.tolist() == [24, 24] and index.offsets.tolist() == [0, 24]
    assert valid_counts.tolist() == [23, 24]
    rows = np.array([0, 47, 20])
    image, text = cache.rows(rows)
    assert image.shape == (3, 32) and np.allclose(image.norm(dim=1).numpy(), 1, atol=1e-2)


def test_train_streams_webdataset_and_resumes_past_the_end_of_an_epoch(tmp_path, shards):
    cfg = _cfg(tmp_path, shards, "--train.steps", "13", "--train.batch_size", "8", "--train.log_every", "1")
    result = train(cfg)
    assert result["steps"] == 13  # 104 draws of 47 samples: into a third epoch
    assert result["skipped_samples"] == 1  # the text file named .png, counted once though met in 3 epochs
    state = safe_torch_load(tmp_path / "run" / "clip" / "checkpoint.pt")
    assert len(state["skipped"]) == 1  # what a resumed run starts its count from
    assert (tmp_path / "run" / "clip" / "model.safetensors").is_file()


def _trained_ids(monkeypatch, cfg) -> list[list[str]]:
    """The sample keys of every training batch, in order."""
    import clipdistill.train as train_module

    seen, to_device = [], train_module.prepare_batch
    monkeypatch.setattr(train_module, "prepare_batch", lambda b, *a: seen.append(b["id"]) or to_device(b, *a))
    train(cfg)
    return seen


def test_train_subset_over_shards_trains_on_the_subset_only(tmp_path, shards, monkeypatch):
    run_embed(_cfg(tmp_path, shards))
    subset = np.arange(0, 48, 3)  # 16 rows over both shards; s0_005 (the bad sample) is not among them
    np.save(tmp_path / "run" / "kept.npy", subset)
    subset_keys = {f"s{row // 24}_{row % 24:03d}" for row in subset}
    steps = ("--train.steps", "6", "--train.batch_size", "4")
    cfg = _cfg(tmp_path, shards, *steps, "--train.subset", "kept.npy")
    batches = _trained_ids(monkeypatch, cfg)
    assert all(len(b) == 4 for b in batches)
    assert set(batches[0] + batches[1] + batches[2] + batches[3]) == subset_keys  # one epoch: each once
    assert set(sum(batches, [])) == subset_keys
    assert train(cfg)["train_samples"] == 16


def test_a_pooled_stream_resumes_where_it_stopped(tmp_path, shards):
    from clipdistill.data.sources import ShardPairs
    from clipdistill.models.factory import create_student

    cfg = _cfg(tmp_path, shards)
    student = create_student(cfg.student)
    source = ShardPairs(cfg.data, student.tokenizer, student.preprocess)
    pool = np.arange(1, 48, 2)  # 24 odd rows

    def ids(start_step, n):
        stream = source.stream(4, seed=3, rank=0, world_size=1, start_step=start_step, subset=pool)
        return [next(stream)["id"] for _ in range(n)]

    full = ids(0, 5)
    assert ids(2, 3) == full[2:]
    assert {24 * int(key[1]) + int(key[3:]) for batch in full for key in batch} <= set(pool.tolist())


class Stop(Exception):
    pass


def test_webdataset_resume_at_steps_off_the_workers_round_gives_the_uninterrupted_weights(
    tmp_path, shards, monkeypatch
):
    """Batches of 4 from 2 workers (a round of 8 samples), stopped after steps 5 and 11 (11 is also the
    end of the first epoch: 47 valid samples), resumed from the checkpoint each time."""
    import torch
    from safetensors.torch import load_file

    import clipdistill.train as train_module
    from clipdistill.checkpoint import safe_torch_load

    run_embed(_cfg(tmp_path, shards))
    extra = ("--train.method", "openclip_distill", "--train.steps", "14", "--train.batch_size", "4",
             "--data.num_workers", "2", "--train.ckpt_every", "1",
             "--train.deterministic", "true")  # fmt: skip
    stopped = _cfg(tmp_path, shards, *extra, "--train.name", "stopped")
    to_device = train_module.prepare_batch
    for start, stop_after in ((0, 5), (5, 11)):
        calls = []

        def counted(batch, *args, steps=stop_after - start, calls=calls):
            calls.append(1)
            if len(calls) > steps:
                raise Stop
            return to_device(batch, *args)

        monkeypatch.setattr(train_module, "prepare_batch", counted)
        with pytest.raises(Stop):
            train(stopped)
        assert safe_torch_load(tmp_path / "run" / "stopped" / "checkpoint.pt")["step"] == stop_after
    monkeypatch.setattr(train_module, "prepare_batch", to_device)
    train(stopped)
    train(_cfg(tmp_path, shards, *extra, "--train.name", "whole"))
    torch.use_deterministic_algorithms(False)
    resumed = load_file(tmp_path / "run" / "stopped" / "model.safetensors")
    whole = load_file(tmp_path / "run" / "whole" / "model.safetensors")
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_shards_changed_after_embed_are_refused_by_embed_and_train(tmp_path, shards):
    """Other keys: embed names the shards (the manifest), train refuses before its first batch."""
    from clipdistill.cache import CacheMismatchError

    run_embed(_cfg(tmp_path, shards))
    write_shard(tmp_path / "001.tar", [f"new_{i:03d}" for i in range(24)], np.random.default_rng(1))
    with pytest.raises(CacheMismatchError, match="the shards changed"):
        run_embed(_cfg(tmp_path, shards))
    with pytest.raises(CacheMismatchError, match="was built from data"):
        train(_cfg(tmp_path, shards, "--train.method", "openclip_distill", "--train.steps", "12",
                   "--train.batch_size", "4"))  # fmt: skip


def test_unreadable_shards_are_refused_naming_each_before_anything_is_embedded(tmp_path, shards):
    """Random bytes, an empty file and a tar cut inside its first header: their sample counts are
    unknown, so they cannot be weighed against embed.max_skip_fraction as one skip each."""
    real = (tmp_path / "001.tar").read_bytes()
    (tmp_path / "001.tar").write_bytes(np.random.default_rng(5).bytes(20_000))
    (tmp_path / "002.tar").write_bytes(b"")
    (tmp_path / "003.tar").write_bytes(real[:100])
    cfg = _cfg(tmp_path, str(tmp_path / "{000..003}.tar"))
    with pytest.raises(ValueError, match="3 of 4 shards") as refused:
        run_embed(cfg)
    message = str(refused.value)
    assert "\n" not in message and "000.tar" not in message
    assert all(str(tmp_path / f"00{s}.tar") in message for s in (1, 2, 3))
    assert not list((tmp_path / "run" / "cache").glob("emb_*.npy"))
    with pytest.raises(ValueError, match="3 of 4 shards"):  # train without a cache reads the shards too
        train(
            _cfg(tmp_path, str(tmp_path / "{000..003}.tar"), "--train.steps", "1", "--train.batch_size", "4")
        )


def _rewrite_captions(tmp_path) -> None:
    """Shard 001 edited in place: the same keys and images, captions of the same length: the tar's
    keys, record count and byte size are unchanged."""
    before = (tmp_path / "001.tar").stat().st_size
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "scratch.tar", [f"s0_{i:03d}" for i in range(24)], rng)  # 001's images come next
    write_shard(tmp_path / "001.tar", [f"s1_{i:03d}" for i in range(24)], rng, caption="a photo of ITEM")
    assert (tmp_path / "001.tar").stat().st_size == before


def test_a_shard_edited_in_place_is_refused_by_embed_and_train(tmp_path, shards, teacher):
    from clipdistill.cache import CacheMismatchError

    cfg = _cfg(tmp_path, shards, "--teacher.pretrained", teacher)
    run_embed(cfg)
    assert run_embed(cfg)["shards_computed"] == 0  # unchanged: reused
    _rewrite_captions(tmp_path)
    with pytest.raises(CacheMismatchError, match="data webdataset:") as refused:
        run_embed(cfg)
    assert "\n" not in str(refused.value)
    with pytest.raises(CacheMismatchError, match="was built from data"):
        train(_cfg(tmp_path, shards, "--teacher.pretrained", teacher, "--train.method", "openclip_distill"))


def test_the_same_shards_named_from_another_folder_are_the_same_data(tmp_path, shards, teacher, monkeypatch):
    cfg = _cfg(tmp_path, shards, "--teacher.pretrained", teacher)
    run_embed(cfg)
    monkeypatch.chdir(tmp_path)
    relative = _cfg(tmp_path, "{000..001}.tar", "--teacher.pretrained", teacher)
    assert run_embed(relative)["shards_computed"] == 0  # reused, not refused as other data


def _unfinish(folder) -> None:
    """The cache as `kill -9` leaves it before its last shard: no last shard, valid.npy or manifest."""
    for name in ("emb_00002.npy", "shard_00002.json", "valid.npy", "manifest.npz", "report.json"):
        (folder / name).unlink()


def test_an_unfinished_cache_resumes_over_the_same_shards_and_refuses_edited_ones(tmp_path, shards, teacher):
    from clipdistill.cache import CacheMismatchError

    cfg = _cfg(tmp_path, shards, "--teacher.pretrained", teacher)
    run_embed(cfg)
    folder = tmp_path / "run" / "cache"
    whole = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "report.json"}
    _unfinish(folder)
    assert run_embed(cfg)["shards_computed"] == 1
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "report.json"} == whole
    _unfinish(folder)
    _rewrite_captions(tmp_path)
    with pytest.raises(CacheMismatchError, match=r"started with other settings \(data webdataset:"):
        run_embed(cfg)
    assert not (folder / "shard_00002.json").exists()


def _black_jpg_white_png(path) -> None:
    """4 samples, each with a black .jpg, a white .png, tags in .txt and a sentence in .caption."""
    members = []
    for i in range(4):
        sample = {"txt": f"tags {i}".encode(), "caption": f"a caption of {i}".encode()}
        for ext, fmt, grey in (("jpg", "JPEG", 0), ("png", "PNG", 255)):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (grey, grey, grey)).save(buf, format=fmt)
            sample[ext] = buf.getvalue()
        members += [(f"k{i}.{ext}", data) for ext, data in sample.items()]
    write_tar(path, members)


def _first_batch(tmp_path, *keys) -> tuple[torch.Tensor, list[str]]:
    """(the images, the captions) of the 4 samples, read with data.image_key/caption_key `keys`."""
    from clipdistill.data.sources import ShardPairs
    from clipdistill.models.factory import Preprocess

    _black_jpg_white_png(tmp_path / "members.tar")
    texts = []

    def tokenizer(batch):
        texts.extend(batch)
        return torch.zeros(len(batch), 4, dtype=torch.long)

    cfg = _cfg(tmp_path, str(tmp_path / "members.tar"), *keys)
    source = ShardPairs(cfg.data, tokenizer, Preprocess(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    (batch,) = source.batches([np.arange(4)])
    return batch["image"], texts


def test_webdataset_members_are_chosen_by_image_key_and_caption_key(tmp_path):
    image, texts = _first_batch(tmp_path)  # the defaults: the first image and caption extension found
    assert (image < 0).all() and texts == [f"tags {i}" for i in range(4)]
    image, texts = _first_batch(tmp_path, "--data.image_key", "png", "--data.caption_key", "caption")
    assert (image > 0).all() and texts == [f"a caption of {i}" for i in range(4)]
    image, _ = _first_batch(tmp_path, "--data.image_key", "webp,PNG")  # a list, tried in order
    assert (image > 0).all()


def test_a_member_no_sample_has_or_a_json_caption_is_one_clear_line(tmp_path):
    from clipdistill.config import ConfigError
    from clipdistill.embed import TooManySkipped

    _black_jpg_white_png(tmp_path / "members.tar")
    cfg = _cfg(tmp_path, str(tmp_path / "members.tar"), "--data.image_key", "webp")
    with pytest.raises(TooManySkipped, match=r"4 missing_image .* from \.webp members \(data.image_key\)"):
        run_embed(cfg)
    with pytest.raises(ConfigError, match="data.caption_key 'json'"):
        run_embed(_cfg(tmp_path, str(tmp_path / "members.tar"), "--data.caption_key", "json"))


def _stream_ids(source, global_batch, rank, world_size, steps, subset, start_step=0) -> list[list[str]]:
    stream = source.stream(global_batch, 3, rank, world_size, start_step, subset=subset)
    return [next(stream)["id"] for _ in range(steps)]


def test_two_ranks_share_every_global_batch_of_a_subset_kept_in_one_shard(tmp_path, shards):
    """A `balance`d subset all in shard 001: each rank still gets its half of every global batch of
    one process's stream, epoch after epoch (3 global batches of 4 per epoch), and resumes mid-way."""
    from clipdistill.data.sources import ShardPairs
    from clipdistill.models.factory import create_student

    student = create_student(_cfg(tmp_path, shards).student)
    source = ShardPairs(_cfg(tmp_path, shards).data, student.tokenizer, student.preprocess)
    subset = np.arange(24, 36)
    one = _stream_ids(source, 4, 0, 1, 8, subset)
    two = [_stream_ids(source, 4, rank, 2, 8, subset) for rank in range(2)]
    assert [a + b for a, b in zip(*two, strict=True)] == one
    assert all(len(batch) == 2 for rank in two for batch in rank)
    assert sorted(sum(one[:3], [])) == [f"s1_{i:03d}" for i in range(12)]  # an epoch: each kept sample once
    assert _stream_ids(source, 4, 1, 2, 3, subset, start_step=5) == two[1][5:]
    with pytest.raises(ValueError, match="12 samples .* global batch of 16"):  # said before any batch
        source.stream(16, 3, 0, 2, 0, subset=subset)
