"""ComKD: stage-1 prompt tuning of the teacher (CoOp) and stage-2 distillation on unlabeled images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

import clipdistill.data.lab as lab_module
import clipdistill.train as train_module
from cid_fixtures import build_tiny_cache, stage_config
from clipdistill.cache import TeacherCache
from clipdistill.config import ComkdConfig, ConfigError, ModelConfig, RunConfig, replace
from clipdistill.evaluate.run import run_eval
from clipdistill.export import run_export
from clipdistill.losses.comkd import Projector
from clipdistill.methods import build_task, needs_teacher_cache
from clipdistill.models.classifier import TrainedClassifier
from clipdistill.models.factory import count_parameters, create_student, create_teacher
from clipdistill.models.heads import ComkdHead, load_head
from clipdistill.models.prompts import TextPromptLearner, VisualPromptLearner, attach_visual_prompts
from clipdistill.predict import load_backend
from clipdistill.train import train
from conftest import needs_lab
from own_data import hf_cache, tiny_model, tiny_model_config

pytestmark = needs_lab

STAGE1 = ("--train.role", "teacher", "--train.method", "prompt_teacher", "--train.lr", "0.05")


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory, lab=True)


@pytest.fixture(scope="module")
def prompted(tiny_cache, tmp_path_factory) -> RunConfig:
    """A run dir with the tiny teacher's cache and its stage-1 prompts (3 steps)."""
    cfg = stage_config(tiny_cache, tmp_path_factory.mktemp("prompted"), *STAGE1, "--train.steps", "3")
    train(cfg)
    return cfg


def _metrics(cfg: RunConfig, name: str) -> list[dict]:
    path = Path(cfg.run_dir) / name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _initial_teacher(cfg: RunConfig):
    """The teacher exactly as the trainer builds it (same seed) before stage 1 touches it."""
    torch.manual_seed(cfg.train.seed)
    return create_teacher(cfg.teacher, trainable=True)


def _check_stage1(cfg: RunConfig, dim: int) -> None:
    out = Path(cfg.run_dir) / "prompt_teacher"
    initial = _initial_teacher(cfg)
    saved = load_file(out / "model.safetensors")
    assert all(torch.equal(v, saved[k]) for k, v in initial.model.state_dict().items())  # teacher frozen
    init_ctx = TextPromptLearner(initial.model, initial.tokenizer, ["x"], cfg.comkd.n_ctx).ctx
    ctx = load_file(out / "heads.safetensors")["prompts.ctx"]
    assert ctx.shape == init_ctx.shape and not torch.allclose(ctx, init_ctx)  # the prompts learned
    bank = np.load(out / "text_bank.npy")
    assert bank.shape == (10, dim)  # every class, base and novel
    np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1.0, rtol=1e-5)
    split = json.loads((out / "split.json").read_text())
    assert len(split["base"]) == len(split["novel"]) == 5
    assert sorted(split["base"] + split["novel"]) == list(range(10))


def test_prompt_teacher_learns_only_the_prompts(prompted):
    _check_stage1(prompted, dim=32)
    records = _metrics(prompted, "prompt_teacher")
    assert len(records) == 3 and all(np.isfinite(r["ce"]) and r["ce"] > 0 for r in records)


def test_prompt_teacher_trains_on_base_labels_only(prompted):
    loaded = _initial_teacher(prompted)
    task = build_task(prompted, loaded.model, None)
    assert not needs_teacher_cache("prompt_teacher")
    assert [n for n, p in task.named_parameters() if p.requires_grad] == ["prompts.ctx"]
    assert set(task.heads()) == {"prompts"}
    novel = (task.base_label < 0).nonzero().flatten()[:4]
    batch = {"image": torch.zeros(4, 3, 32, 32), "index": novel}
    assert task(batch)["loss"].item() == 0.0  # novel-class images carry no label in stage 1
    with pytest.raises(ConfigError, match="role teacher"):
        prompted.train.role = "student"
        build_task(prompted, loaded.model, None)
    prompted.train.role = "teacher"


def test_prompt_teacher_on_minilm_goes_through_inputs_embeds(tiny_config):
    cfg = tiny_config(
        *STAGE1, "--teacher.name", "lab-teacher", "--teacher.lock_text", "true",
        "--train.steps", "1", "--train.batch_size", "8", "--data.train_size", "64",
    )  # fmt: skip
    train(cfg)
    _check_stage1(cfg, dim=256)


def test_prompt_teacher_of_a_hugging_face_hub_teacher(tiny_config, tmp_path, monkeypatch):
    """Stage 1 takes its tokenizer from the teacher's config wherever the teacher comes from."""
    cache = hf_cache(
        tmp_path / "hf", "org/tiny", tiny_model(), tiny_model_config(), "open_clip_model.safetensors"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    cfg = tiny_config(
        *STAGE1, "--teacher.name", "hf-hub:org/tiny",
        "--train.steps", "1", "--train.batch_size", "8", "--data.train_size", "64",
    )  # fmt: skip
    train(cfg)
    _check_stage1(cfg, dim=24)


def _stage2(tiny_cache, prompted, tmp_path, *extra: str) -> RunConfig:
    cfg = stage_config(tiny_cache, tmp_path / "run", "--train.steps", "2", *extra)
    shutil.copytree(Path(prompted.run_dir) / "prompt_teacher", tmp_path / "run" / "prompt_teacher")
    return cfg


def test_comkd_and_promptkd_train_from_cache_and_text_bank(tiny_cache, prompted, tmp_path, monkeypatch):
    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher must not be built in stage 2")

    monkeypatch.setattr(train_module, "create_teacher", no_teacher)
    cfg = _stage2(tiny_cache, prompted, tmp_path, "--train.method", "comkd")
    train(cfg)
    for r in _metrics(cfg, "comkd"):
        assert r["kd"] >= 0 and r["align"] > 0
        assert r["loss"] == pytest.approx(r["kd"] + r["align"], rel=1e-4)
    heads = load_file(tmp_path / "run" / "comkd" / "heads.safetensors")
    bank = torch.from_numpy(np.load(tmp_path / "run" / "prompt_teacher" / "text_bank.npy"))
    assert torch.allclose(heads["head.text_bank"], bank, atol=1e-6)
    assert "head.edu.alpha" in heads

    cfg.train.method = "promptkd"
    train(cfg)
    for r in _metrics(cfg, "promptkd"):
        assert r["align"] == 0.0 and r["alpha"] == 0.0 and r["loss"] == pytest.approx(r["kd"])
    assert not any("edu" in k for k in load_file(tmp_path / "run" / "promptkd" / "heads.safetensors"))


def test_comkd_student_evaluates_through_its_head(tiny_cache, prompted, tmp_path):
    cfg = _stage2(tiny_cache, prompted, tmp_path, "--train.method", "comkd", "--train.steps", "1")
    train(cfg)
    head = load_head(tmp_path / "run" / "comkd")
    assert isinstance(head, ComkdHead) and head.text_bank.shape == (10, 32)
    cfg.eval.protocol = "all"
    metrics = run_eval(cfg)
    assert {"zeroshot_top1", "linear_probe_top1", "base_acc", "novel_acc", "hm", "domain_shift_avg"} <= set(
        metrics
    )
    assert "retrieval_i2t_r1" not in metrics  # no text tower
    student = create_student(cfg.student).model
    assert metrics["params"] == count_parameters(student.visual) + count_parameters(head)
    assert 0 <= metrics["hm"] <= 100


def test_prompted_student_with_cross_attention_trains_evaluates_and_export_refuses(
    tiny_cache, prompted, tmp_path
):
    """PromptKD's student (prompts, frozen tower) with the paper-faithful modules, end to end."""
    paper = (
        "--comkd.eduattention",
        "cross",
        "--comkd.ifalign_reduction",
        "sum",
        "--comkd.kd_reduction",
        "promptkd",
    )
    student = (
        "--comkd.student_vpt_depth",
        "1",
        "--comkd.student_vpt_tokens",
        "2",
        "--comkd.freeze_backbone",
        "true",
    )
    cfg = _stage2(
        tiny_cache, prompted, tmp_path, "--train.method", "comkd", "--train.steps", "2", *paper, *student
    )
    torch.manual_seed(cfg.train.seed)  # the student exactly as the trainer builds it
    initial = create_student(cfg.student).model.state_dict()
    train(cfg)
    folder = tmp_path / "run" / "comkd"
    trained = load_file(folder / "model.safetensors")
    assert all(torch.equal(trained[k], v) for k, v in initial.items())  # the tower stayed frozen
    assert {"visual_prompts.prompts", "head.edu.q.weight", "head.edu.logit_scale"} <= set(
        load_file(folder / "heads.safetensors")
    )
    records = _metrics(cfg, "comkd")
    assert all(0 <= r["attention_entropy"] <= 1 for r in records)
    classifier = TrainedClassifier(cfg, "comkd")
    assert classifier.kind == "comkd_head" and classifier.visual_prompts  # eval runs the tower with them
    cfg.export.model = "comkd"
    with pytest.raises(ConfigError, match="visual prompts"):
        run_export(cfg)
    with pytest.raises(ConfigError, match="visual prompts"):  # predict's ONNX backend exports first
        load_backend("comkd", "onnx", None, str(tmp_path / "run"))


def test_comkd_needs_the_text_bank(tiny_cache, tmp_path):
    cfg = stage_config(tiny_cache, tmp_path / "run", "--train.method", "comkd")
    model = create_student(cfg.student).model
    with pytest.raises(ConfigError, match="prompt_teacher"):
        build_task(cfg, model, TeacherCache(tmp_path / "run" / "cache"))


def test_alpha_zero_is_identity_through_the_head():
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(10, 16), dim=-1)
    head = ComkdHead(8, bank, ComkdConfig(eduattention="mean_text", attention_scale=0.5))
    plain = ComkdHead(8, bank, ComkdConfig(use_eduattention=False))
    plain.projector.load_state_dict(head.projector.state_dict())
    x = torch.randn(5, 8)
    assert head.edu.alpha.item() == 0.0
    assert torch.equal(head(x), head.project(x))
    assert torch.allclose(head.logits(x), plain.logits(x))


class _Unreadable:
    """Stands in for the lab's labels: any read other than its length fails the test."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getattr__(self, name):
        raise AssertionError(f"stage 2 read the labels ({name})")

    def __getitem__(self, key):
        raise AssertionError("stage 2 read the labels")


class _GuardedBatch(dict):
    def __getitem__(self, key):
        if "label" in key:
            raise AssertionError(f"stage 2 read batch[{key!r}]")
        return super().__getitem__(key)

    def get(self, key, default=None):
        if "label" in key:
            raise AssertionError(f"stage 2 read batch[{key!r}]")
        return super().get(key, default)


def test_stage2_never_reads_a_label(tiny_cache, prompted, tmp_path, monkeypatch):
    real_split = lab_module._split

    def unlabeled_split(*args):  # every split load_lab returns, to whoever calls it
        split = real_split(*args)
        split.labels = _Unreadable(len(split.labels))
        return split

    monkeypatch.setattr(lab_module, "_split", unlabeled_split)
    cfg = _stage2(tiny_cache, prompted, tmp_path, "--train.method", "comkd")
    assert train(cfg)["steps"] == 2  # the trainer and the task ran without touching a label

    task = build_task(cfg, create_student(cfg.student).model, TeacherCache(tmp_path / "run" / "cache"))
    batch = _GuardedBatch(
        image=torch.randn(4, 3, 32, 32), teacher_image=F.normalize(torch.randn(4, 32), dim=-1)
    )
    batch["labels"] = torch.arange(4)
    assert torch.isfinite(task(batch)["loss"])


def test_visual_prompts_change_only_the_prompted_features():
    torch.manual_seed(0)
    model = create_teacher(ModelConfig(name="lab-student-tiny", pretrained="random")).model
    x = torch.randn(3, 3, 32, 32)
    empty = VisualPromptLearner(model.visual, depth=1, n_tokens=0)
    assert torch.allclose(empty(model.visual, x), model.encode_image(x), atol=1e-5)  # no prompts: plain ViT
    vpt = VisualPromptLearner(model.visual, depth=1, n_tokens=2)
    y = vpt(model.visual, x)
    assert y.shape == (3, 32) and not torch.allclose(y, model.encode_image(x))
    y.sum().backward()
    assert vpt.prompts.grad.abs().sum() > 0 and all(p.grad is None for p in model.parameters())


def test_vpt_teacher_features_replace_the_cache_in_stage2(tiny_cache, tmp_path):
    vpt = ("--comkd.vpt_depth", "1", "--comkd.vpt_tokens", "2")
    cfg = stage_config(tiny_cache, tmp_path / "run", *STAGE1, *vpt, "--train.steps", "2")
    init = build_task(cfg, _initial_teacher(cfg).model, None).visual_prompts.prompts.detach().clone()
    train(cfg)
    out = tmp_path / "run" / "prompt_teacher"
    assert not torch.allclose(load_file(out / "heads.safetensors")["visual_prompts.prompts"], init)
    features = np.load(out / "image_features.npy")
    cache = TeacherCache(tmp_path / "run" / "cache")
    plain, _ = cache.rows(np.arange(len(cache)))
    assert features.shape == (len(cache), 32) and not np.allclose(features, plain.numpy(), atol=1e-3)

    teacher = _initial_teacher(cfg).model
    x = torch.randn(2, 3, 32, 32)
    plain_x = teacher.encode_image(x)
    attach_visual_prompts(teacher, out)
    assert not torch.allclose(teacher.encode_image(x), plain_x)  # eval sees the prompted teacher
    cfg.eval.protocol = "base_to_novel"
    assert 0 <= run_eval(cfg)["hm"] <= 100

    stage2 = stage_config(tiny_cache, tmp_path / "run2", "--train.method", "comkd", "--train.steps", "2")
    shutil.copytree(out, tmp_path / "run2" / "prompt_teacher")
    task = build_task(stage2, create_student(stage2.student).model, cache)
    assert torch.equal(task.teacher_images, torch.from_numpy(features))
    batch = {"image": torch.randn(4, 3, 32, 32), "cache_row": torch.tensor([0, 5, 7, 9])}
    assert torch.isfinite(task(batch)["loss"])  # no cached teacher_image needed
    assert train(stage2)["steps"] == 2


def test_projector_starts_as_the_skip_projection():
    torch.manual_seed(0)
    skip = torch.randn(6, 4)
    projector = Projector(4, 6, skip=skip)
    x = torch.randn(3, 4)
    assert torch.allclose(projector(x), x @ skip.T, atol=1e-6)
    projector(x).sum().backward()
    assert projector.net[-1].weight.grad.abs().sum() > 0  # the MLP learns on top of the skip
    with pytest.raises(ValueError, match="4 -> 5"):
        Projector(4, 5, skip=skip)


def test_stage2_starts_from_a_trained_student(tiny_cache, prompted, tmp_path):
    """`comkd.student_init` chains the methods: stage 2 begins with that student's weights and its
    teacher-space image projection, so a step at learning rate 0 is that student's zero-shot over W_t."""
    cfg = _stage2(tiny_cache, prompted, tmp_path, "--train.method", "clip", "--train.name", "init")
    train(cfg)
    init = tmp_path / "run" / "init"
    torch.manual_seed(1)
    skip = torch.randn(32, 32)
    save_file({"proj_image.proj.weight": skip}, init / "heads.safetensors")
    cfg.train.method, cfg.train.name, cfg.train.steps, cfg.train.lr = "comkd", "chained", 1, 0.0
    cfg.comkd.student_init = "init"
    cfg.comkd.eduattention = "mean_text"  # its α starts at 0: the head is P alone at step 0
    train(cfg)
    chained, trained = (
        load_file(tmp_path / "run" / "chained" / "model.safetensors"),
        load_file(init / "model.safetensors"),
    )
    assert all(torch.equal(chained[k], v) for k, v in trained.items())
    head = load_head(tmp_path / "run" / "chained")
    x = torch.randn(5, 32)
    expected = head.logit_scale * F.normalize(F.normalize(x, dim=-1) @ skip.T, dim=-1) @ head.text_bank.T
    assert torch.allclose(head.logits(x), expected, atol=1e-4)

    cfg.train.name, cfg.comkd.student_init = "missing", "no_such_run"
    with pytest.raises(ConfigError, match="no_such_run"):
        train(cfg)


def test_inductive_stage2_sees_base_class_images_only(tiny_cache, prompted, tmp_path):
    cfg = _stage2(tiny_cache, prompted, tmp_path, "--train.method", "comkd", "--comkd.inductive", "true")
    labels = lab_module.load_lab(cfg.data).train.labels.numpy()
    base = json.loads((tmp_path / "run" / "prompt_teacher" / "split.json").read_text())["base"]
    task = build_task(cfg, create_student(cfg.student).model, TeacherCache(tmp_path / "run" / "cache"))
    pool = np.arange(len(labels))
    kept = task.training_pool(pool)
    assert 0 < len(kept) < len(pool) and np.isin(labels[kept], base).all()
    assert np.isin(labels[np.setdiff1d(pool, kept)], base).sum() == 0  # every base image kept
    assert np.array_equal(task.training_pool(pool[::2]), kept[np.isin(kept, pool[::2])])  # within the pool
    transductive = replace(cfg, {"comkd.inductive": False})
    cache = TeacherCache(tmp_path / "run" / "cache")
    every = build_task(transductive, create_student(cfg.student).model, cache)
    assert np.array_equal(every.training_pool(pool), pool)


def test_prompt_teacher_reads_the_cached_teacher_features(prompted):
    task = build_task(prompted, _initial_teacher(prompted).model, None)
    images, cached = torch.randn(2, 3, 32, 32), F.normalize(torch.randn(2, 32), dim=-1).half()
    assert torch.equal(task.encode_image(images, cached), cached.float())
    assert torch.allclose(task.encode_image(images), task.model.encode_image(images))  # no cache: live


def test_stage1_with_a_built_cache_refuses_train_augment(tiny_cache, tmp_path):
    """Stage 1 reads the cache when it is there: its images cannot be cropped under plain targets."""
    cfg = stage_config(tiny_cache, tmp_path / "run", *STAGE1, "--train.steps", "1", "--train.augment", "0.5")
    with pytest.raises(ConfigError, match="run reads the one in"):
        train(cfg)
