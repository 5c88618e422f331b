"""World size 2 on CPU (gloo, spawned processes) against one process holding the whole global batch."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from clipdistill.config import ModelConfig, load_config
from clipdistill.distributed import all_reduce_mean, init_distributed, rank, world_size
from clipdistill.methods.clip import ClipTask
from clipdistill.models.factory import create_model
from clipdistill.runs import output_dir
from clipdistill.train import train
from conftest import pairs_overrides, tiny_overrides, write_shard

pytestmark = pytest.mark.slow  # spawns two processes

GLOBAL_BATCH = 8
TRAIN = ("--train.steps", "3", "--train.lr", "1e-3")
CAPTIONS = [
    f"a photo of a {c}." for c in ("bag", "coat", "shirt", "dress", "sandal", "sneaker", "trouser", "boot")
]


def _task_and_batch() -> tuple[ClipTask, dict]:
    torch.manual_seed(0)
    loaded = create_model(ModelConfig(name="lab-student-tiny"))
    batch = {"image": torch.randn(GLOBAL_BATCH, 3, 32, 32), "text": loaded.tokenizer(CAPTIONS)}
    return ClipTask(loaded.model), batch


def _gradients(task: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in task.named_parameters()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, port: int, out: str, train_args: list[str]) -> None:
    """One rank: the env torchrun would set, then the same code path as a real run."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(local_rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(local_rank),
    )
    torch.set_num_threads(1)
    info = init_distributed(torch.device("cpu"))
    assert (info.rank, info.world_size, rank(), world_size()) == (local_rank, 2, local_rank, 2)

    # (a) the CLIP loss of this rank's rows against the gathered batch, gradients averaged by DDP
    task, batch = _task_and_batch()
    ddp = DistributedDataParallel(task)
    rows = slice(local_rank * GLOBAL_BATCH // 2, (local_rank + 1) * GLOBAL_BATCH // 2)
    loss = ddp({k: v[rows] for k, v in batch.items()})["loss"]
    loss.backward()
    torch.save(
        {"loss": loss.detach(), "mean_loss": all_reduce_mean(loss), "grads": _gradients(task)},
        f"{out}/rank{local_rank}.pt",
    )

    # (b) the trainer itself
    train(load_config(None, train_args))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, synthetic_pairs):
    out = tmp_path_factory.mktemp("ranks")
    train_args = pairs_overrides(out / "run", synthetic_pairs, *TRAIN)
    mp.spawn(_worker, args=(_free_port(), str(out), train_args), nprocs=2, join=True)
    return out


def test_clip_loss_and_gradients_match_one_process(two_ranks):
    ranks = [torch.load(two_ranks / f"rank{r}.pt", weights_only=True) for r in range(2)]
    task, batch = _task_and_batch()
    loss = task(batch)["loss"]
    loss.backward()
    expected = _gradients(task)

    assert not torch.allclose(ranks[0]["loss"], ranks[1]["loss"])  # each rank has its own rows
    for r in ranks:
        torch.testing.assert_close(r["mean_loss"], loss.detach(), rtol=0, atol=1e-5)
        assert r["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert expected["model.logit_scale"].abs() > 0  # the temperature trains too


def test_train_world_size_2_equals_world_size_1(two_ranks, pairs_config):
    cfg = pairs_config(*TRAIN)
    single = train(cfg)
    assert single["world_size"] == 1
    two = load_file(output_dir(pairs_config(run_dir=two_ranks / "run")) / "model.safetensors")
    one = load_file(output_dir(cfg) / "model.safetensors")
    init = _task_and_batch()[0].model.state_dict()
    assert one.keys() == two.keys()
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=0, atol=1e-5, msg=name)
    assert any(not torch.allclose(one[name], init[name]) for name in one)  # training moved the weights


def _train_worker(local_rank: int, port: int, train_args: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(local_rank))  # fmt: skip
    torch.set_num_threads(1)
    train(load_config(None, train_args))
    dist.destroy_process_group()


def _subset_of_one_shard(tmp_path, run: str) -> list[str]:
    """A run on 3 shards of 8 samples whose `train.subset` (as `balance` writes it) lies in shard 001."""
    rng = np.random.default_rng(0)
    for s in range(3):
        if not (tmp_path / f"{s:03d}.tar").is_file():
            write_shard(tmp_path / f"{s:03d}.tar", [f"s{s}_{i}" for i in range(8)], rng)
    (tmp_path / run).mkdir()
    np.save(tmp_path / run / "kept.npy", np.arange(8, 16))
    return tiny_overrides(
        tmp_path / run, "--data.kind", "webdataset", "--data.path", str(tmp_path / "{000..002}.tar"),
        "--train.subset", "kept.npy", "--train.batch_size", "4", *TRAIN,
    )  # fmt: skip


def test_webdataset_subset_in_one_shard_trains_on_2_ranks_as_on_1(tmp_path):
    """Each rank takes its half of every global batch of one process's shard stream: no rank runs out
    of samples (the subset is 2 batches an epoch, the run 3 steps) and the weights are one process's."""
    mp.spawn(_train_worker, args=(_free_port(), _subset_of_one_shard(tmp_path, "two")), nprocs=2, join=True)
    single = train(load_config(None, _subset_of_one_shard(tmp_path, "one")))
    assert single["world_size"] == 1 and single["train_samples"] == 8
    one, two = (load_file(tmp_path / run / "clip" / "model.safetensors") for run in ("one", "two"))
    assert one.keys() == two.keys()
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=0, atol=1e-5, msg=name)
