"""`embed` and the `cluster` labelling pass in 2 processes (gloo, spawned as torchrun would) write the
same bytes as in one; a shard deleted afterwards is recomputed alone."""

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import save_file

from clipdistill.config import ModelConfig, load_config
from clipdistill.curate.cluster import assign_labels
from clipdistill.curate.stages import run_cluster
from clipdistill.embed import run_embed
from clipdistill.models.factory import create_model
from conftest import png_bytes, write_tar

SHARDS, PER_SHARD = 4, 10


def _write_shards(folder) -> str:
    rng = np.random.default_rng(0)
    for s in range(SHARDS):
        members = []
        for i in range(PER_SHARD):
            image = png_bytes(rng)
            members += [(f"s{s}_{i:02d}.png", b"broken" if (s, i) == (2, 4) else image),
                        (f"s{s}_{i:02d}.txt", f"item {s} {i}".encode())]  # fmt: skip
        write_tar(folder / f"{s:03d}.tar", members)
    return str(folder / f"{{000..{SHARDS - 1:03d}}}.tar")


def _cfg(run_dir, shards):
    weights = str(Path(shards).parent / "teacher.safetensors")
    return load_config(None, [
        "--run_dir", str(run_dir), "--data.kind", "webdataset", "--data.path", shards,
        "--teacher.name", "lab-student-tiny", "--teacher.pretrained", weights, "--teacher.lock_text", "false",
        "--embed.shard_size", "8", "--embed.batch_size", "3", "--embed.device", "cpu",
        "--cluster.n_clusters", "3",
    ])  # fmt: skip


def _points() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.normal(size=(45, 6)).astype(np.float32), rng.normal(size=(4, 6)).astype(np.float32)


def _worker(rank: int, port: int, run_dir: str, shards: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    cfg = _cfg(run_dir, shards)
    report = run_embed(cfg)  # joins the process group
    run_cluster(cfg)
    points, centroids = _points()
    np.save(f"{out}/labels{rank}.npy", assign_labels(points, centroids, chunk=7))
    np.save(f"{out}/computed{rank}.npy", np.array(report["shards_computed"]))
    dist.destroy_process_group()


def _spawn(run_dir, shards, out) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(run_dir), shards, str(out)), nprocs=2, join=True)


def _files(folder, but: str = "") -> dict[str, bytes]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != but)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def _cache_files(run_dir) -> dict[str, bytes]:
    """Every cache file's bytes, but for the report, which holds the time embedding took."""
    return _files(run_dir / "cache", but="report.json")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed2")
    shards = _write_shards(root)
    torch.manual_seed(0)
    save_file(
        create_model(ModelConfig(name="lab-student-tiny")).model.state_dict(), root / "teacher.safetensors"
    )
    one = _cfg(root / "one", shards)
    run_embed(one)
    run_cluster(one)
    _spawn(root / "two", shards, root)
    return root, shards


def test_two_processes_write_the_cache_and_the_clusters_byte_for_byte(runs):
    root, _ = runs
    one, two = root / "one", root / "two"
    cache = _cache_files(one)
    assert {"meta.json", "valid.npy", "manifest.npz", "emb_00004.npy", "shard_00004.json"} <= cache.keys()
    assert _cache_files(two) == cache
    assert _files(two / "cluster") == _files(one / "cluster")
    assert int(np.load(root / "computed0.npy")) == 5  # 40 rows in 8-row shards, over both ranks


def test_the_labelling_pass_is_split_and_gathered(runs):
    root, _ = runs
    points, centroids = _points()
    expected = assign_labels(points, centroids, chunk=7)
    for rank in range(2):  # 7 chunks of 7 rows: ranks 0 and 1 each labelled some, both hold all
        assert np.array_equal(np.load(root / f"labels{rank}.npy"), expected)


def test_a_lost_shard_is_recomputed_alone_by_two_processes(runs, tmp_path):
    root, shards = runs
    import shutil

    shutil.copytree(root / "two", tmp_path / "two")
    for name in ("emb_00002.npy", "shard_00002.json"):
        (tmp_path / "two" / "cache" / name).unlink()
    _spawn(tmp_path / "two", shards, tmp_path)
    assert int(np.load(tmp_path / "computed1.npy")) == 1
    assert _cache_files(tmp_path / "two") == _cache_files(root / "one")
