"""`train.optimizer`: AdamW (the default) or SGD with momentum (CoOp's and PromptKD's recipe)."""

import pytest
import torch
from torch import nn

from clipdistill.checkpoint import safe_torch_load
from clipdistill.config import ConfigError, TrainConfig, to_dict
from clipdistill.methods.task import Task
from clipdistill.runs import output_dir
from clipdistill.train import _fingerprinted, make_optimizer, train, training_fingerprint


class _Task(Task):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)


def test_adamw_is_the_default():
    opt = make_optimizer(_Task(), TrainConfig(lr=0.01, weight_decay=0.2))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.98)
    assert opt.defaults["fused"]  # one kernel over all parameters: a tenth of a lab step on CPU
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.2]  # bias without decay


def test_sgd_has_momentum_and_the_same_decay_rule():
    opt = make_optimizer(_Task(), TrainConfig(optimizer="sgd", lr=0.005, weight_decay=5e-4))
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["lr"] == 0.005
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 5e-4]


def test_unknown_optimizer_is_refused_when_the_config_loads(tiny_config):
    with pytest.raises(ConfigError, match="train.optimizer: 'lion' is not one of 'adamw', 'sgd'"):
        tiny_config("--train.optimizer", "lion")


def test_default_optimizer_keeps_the_fingerprint_of_older_runs(tiny_config):
    cfg = tiny_config()
    older = to_dict(cfg)
    del older["train"]["optimizer"]  # a run written before the key existed
    assert _fingerprinted(older) == _fingerprinted(to_dict(cfg))
    assert training_fingerprint(tiny_config("--train.optimizer", "sgd")) != training_fingerprint(cfg)


def test_training_with_sgd(pairs_config):
    cfg = pairs_config("--train.optimizer", "sgd", "--train.lr", "0.005")
    train(cfg)
    state = safe_torch_load(output_dir(cfg) / "checkpoint.pt")
    groups = state["optimizer"]["param_groups"]
    assert all(g["momentum"] == 0.9 for g in groups)
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())
