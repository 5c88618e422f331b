"""--train.grad_share: each loss term's gradient norm on the shared parameters, on log steps only, and a
default path that is untouched (same weights, same random state, no extra backward)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.config import NEWER_DEFAULTS, ComkdConfig, DistillConfig, ModelConfig, TrainConfig, to_dict
from clipdistill.methods.baselines import BaselineTask
from clipdistill.methods.comkd import ComkdTask
from clipdistill.methods.task import Task, loss_terms
from clipdistill.models.factory import create_student
from clipdistill.runs import output_dir
from clipdistill.train import (
    _fingerprinted,
    gradient_shares,
    make_trainer,
    train,
    train_step,
    training_fingerprint,
)
from conftest import cached_pair_batch


class TwoTerms(Task):
    """A shared layer feeding two terms, a layer only the second term uses, and dropout (random state)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        self.extra = nn.Linear(4, 1)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        h = self.model(batch["image"])
        kd, align = h.pow(2).mean(), self.extra(h).abs().mean()
        loss = 3 * kd + align
        return {"loss": loss, "kd": kd.detach(), "term/kd": 3 * kd, "term/align": align}


def _batches(n: int = 8):
    g = torch.Generator().manual_seed(0)
    while True:
        yield {"image": torch.randn(n, 4, generator=g), "index": torch.arange(n), "skipped": []}


def _train(grad_share: bool, steps: int = 4) -> tuple[Task, list[dict], torch.Tensor]:
    torch.manual_seed(0)
    task = TwoTerms()
    tc = TrainConfig(steps=steps, log_every=2, warmup_steps=1, grad_share=grad_share, amp=False)
    trainer = make_trainer(task, tc, torch.device("cpu"))
    batches = _batches()
    parts = [train_step(trainer, batches, step).parts for step in range(steps)]
    return task, parts, torch.get_rng_state()


def test_grad_share_is_logged_on_log_steps_only_and_leaves_training_bit_identical(monkeypatch):
    off_task, off_parts, off_rng = _train(False)
    calls = []
    backward = torch.Tensor.backward
    monkeypatch.setattr(
        torch.Tensor, "backward", lambda self, *a, **k: calls.append(1) or backward(self, *a, **k)
    )
    _train(False)
    assert len(calls) == 4  # one backward per step when off
    monkeypatch.undo()
    on_task, on_parts, on_rng = _train(True)
    assert all(not any(k.startswith(("grad_", "term/")) for k in p) for p in off_parts)
    assert [sorted(k for k in p if k.startswith("grad_")) for p in on_parts] == [
        [],
        ["grad_norm/align", "grad_norm/kd", "grad_share/align", "grad_share/kd"],
        [],
        ["grad_norm/align", "grad_norm/kd", "grad_share/align", "grad_share/kd"],
    ]
    for a, b in zip(off_task.state_dict().values(), on_task.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # same weights, bit for bit
    assert torch.equal(off_rng, on_rng)  # no extra draw
    for off, on in zip(off_parts, on_parts, strict=True):
        assert {k: v for k, v in on.items() if not k.startswith("grad_")} == off


def test_train_writes_the_shares_to_metrics_and_keeps_the_fingerprint(pairs_config):
    cfg = pairs_config("--train.grad_share", "true", "--train.log_every", "2")
    assert training_fingerprint(cfg) == training_fingerprint(pairs_config())  # logging only: resumable
    train(cfg)
    lines = (output_dir(cfg) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:  # plain CLIP has one term: all of the shared gradient is its
        assert r["grad_share/clip"] == 1.0 and r["grad_norm/clip"] > 0


def test_gradient_norms_are_over_the_shared_parameters_only():
    torch.manual_seed(1)
    task = TwoTerms().eval()  # no dropout: the hand computation below sees the same graph
    parts = task({"image": torch.randn(6, 4)})
    out = gradient_shares(task, parts)
    shared = list(task.model[0].parameters())  # `extra` is reached by the align term alone
    for name, term in loss_terms(parts).items():
        grads = torch.autograd.grad(term, shared, retain_graph=True)
        assert out[f"grad_norm/{name}"] == pytest.approx(math.sqrt(sum(g.pow(2).sum() for g in grads)))
    assert out["grad_share/kd"] + out["grad_share/align"] == pytest.approx(1.0)
    assert all(p.grad is None for p in task.parameters())  # measured, not accumulated


def test_a_term_that_reaches_no_parameter_has_share_zero():
    task = TwoTerms()
    parts = task({"image": torch.randn(6, 4)})
    parts["term/align"] = parts["term/align"].detach()
    out = gradient_shares(task, parts)
    assert out["grad_norm/align"] == 0.0 and out["grad_share/kd"] == 1.0


@pytest.fixture(scope="module")
def tiny_student():
    return create_student(ModelConfig(name="lab-student-tiny")).model


def _comkd_batch(n: int = 6) -> dict:
    g = torch.Generator().manual_seed(3)
    return {
        "image": torch.randn(n, 3, 32, 32, generator=g),
        "teacher_image": F.normalize(torch.randn(n, 16, generator=g), dim=-1),
    }


@pytest.mark.parametrize("eduattention", ["mean_text", "cross"])
def test_comkd_reports_kd_and_align_terms_entropy_and_alpha(tiny_student, eduattention):
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(10, 16), dim=-1)
    cfg = ComkdConfig(eduattention=eduattention, ifalign_reduction="sum", kd_reduction="promptkd")
    task = ComkdTask(copy.deepcopy(tiny_student), bank, cfg)
    parts = task(_comkd_batch())
    assert set(loss_terms(parts)) == {"kd", "align"}
    assert 0.0 <= float(parts["attention_entropy"]) <= 1.0
    assert float(parts["alpha"]) == pytest.approx(0.1 if eduattention == "cross" else 0.0)
    out = gradient_shares(task, parts)
    assert out["grad_norm/kd"] > 0 and out["grad_norm/align"] > 0  # both reach the tower and P
    promptkd = ComkdTask(
        copy.deepcopy(tiny_student), bank, ComkdConfig(use_ifalign=False, use_eduattention=False)
    )
    assert set(loss_terms(promptkd(_comkd_batch()))) == {"kd"}


def test_comkd_student_prompts_with_a_frozen_backbone(tiny_student):
    bank = F.normalize(torch.randn(10, 16), dim=-1)
    cfg = ComkdConfig(student_vpt_depth=1, student_vpt_tokens=2, freeze_backbone=True)
    task = ComkdTask(copy.deepcopy(tiny_student), bank, cfg)
    trainable = {name for name, _ in task.trainable_parameters()}
    assert "visual_prompts.prompts" in trainable
    assert not any(name.startswith("model.") for name in trainable)
    assert any(name.startswith("head.projector.") for name in trainable)
    task(_comkd_batch())["loss"].backward()
    assert task.visual_prompts.prompts.grad.abs().sum() > 0
    assert set(task.heads()) == {"head", "visual_prompts"}  # saved where eval's attach_visual_prompts reads


@pytest.mark.parametrize("kind", ["fd", "icl", "openclip_distill"])
def test_baselines_report_clip_and_kd_terms(tiny_student, kind):
    torch.manual_seed(0)
    cfg = DistillConfig(weight=2.0, icl_own_scale=kind == "icl")
    task = BaselineTask(copy.deepcopy(tiny_student), kind, 16, cfg)
    batch = cached_pair_batch()
    parts = task(batch)
    terms = loss_terms(parts)
    assert set(terms) == {"clip", "kd"}
    assert float(sum(terms.values()).detach()) == pytest.approx(float(parts["loss"].detach()), rel=1e-5)
    out = gradient_shares(task, parts)
    assert out["grad_norm/clip"] > 0 and out["grad_norm/kd"] > 0
    if kind == "icl":
        assert "kd_loss.logit_scale" in {name for name, _ in task.trainable_parameters()}


def _without_newer_keys(values: dict) -> dict:
    """A config as a run written before every NEWER_DEFAULTS key existed has it."""
    for section, keys in NEWER_DEFAULTS.items():
        for key in keys:
            values[section].pop(key)
    return values


def test_the_new_method_keys_at_their_older_values_keep_older_runs_fingerprints(pairs_config):
    """Runs written before the ComKD and ICL options existed still resume and still count as done."""
    older_modules = ("--comkd.eduattention", "mean_text", "--comkd.ifalign_reduction", "mean")
    cfg = pairs_config("--train.method", "comkd", *older_modules)
    now = _fingerprinted(to_dict(cfg))
    assert _fingerprinted(_without_newer_keys(to_dict(cfg))) == now
    changed = pairs_config("--train.method", "comkd", *older_modules, "--comkd.kd_reduction", "promptkd")
    assert training_fingerprint(changed) != training_fingerprint(cfg)  # a new value is a new run
    # today's module defaults make another ComKD run, but not another stage-1 or PromptKD run
    assert training_fingerprint(pairs_config("--train.method", "comkd")) != training_fingerprint(cfg)
    for method in ("prompt_teacher", "promptkd"):
        modules_then = _without_newer_keys(to_dict(pairs_config("--train.method", method, *older_modules)))
        assert _fingerprinted(modules_then) == _fingerprinted(to_dict(pairs_config("--train.method", method)))
