"""A reinforced cache under torchrun: 2 processes (gloo, spawned as torchrun would) embed the same bytes
as one, and train on its views the same model as one."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from clipdistill.config import ModelConfig, load_config
from clipdistill.embed import run_embed
from clipdistill.models.factory import create_model
from clipdistill.runs import cache_dir, output_dir
from clipdistill.train import train
from conftest import pairs_overrides

pytestmark = pytest.mark.slow  # spawns two processes

ARGS = ("--embed.views", "3", "--embed.shard_size", "32", "--train.method", "fd", "--train.steps", "3")


def _worker(rank: int, port: int, args: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    cfg = load_config(None, args)
    run_embed(cfg)  # joins the process group
    train(cfg)
    dist.destroy_process_group()


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "report.json"}


def test_two_ranks_embed_and_train_views_as_one(tmp_path, synthetic_pairs):
    torch.manual_seed(0)  # a fixed teacher: a random stand-in would differ between processes
    weights = tmp_path / "teacher.safetensors"
    save_file(create_model(ModelConfig(name="lab-student-tiny")).model.state_dict(), weights)
    extra = (*ARGS, "--teacher.pretrained", str(weights))
    one = load_config(None, pairs_overrides(tmp_path / "one", synthetic_pairs, *extra))
    run_embed(one)
    train(one)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = pairs_overrides(tmp_path / "two", synthetic_pairs, *extra)
    mp.spawn(_worker, args=(port, args), nprocs=2, join=True)
    two = load_config(None, args)
    assert "views_00007.npy" in _files(cache_dir(one))
    assert _files(cache_dir(two)) == _files(cache_dir(one))
    a, b = (load_file(output_dir(cfg) / "model.safetensors") for cfg in (one, two))
    for name, value in a.items():
        torch.testing.assert_close(b[name], value, rtol=0, atol=1e-5, msg=name)
