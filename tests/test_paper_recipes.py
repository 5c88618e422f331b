"""configs/paper/: each recipe loads, and builds its teacher, student, method and optimiser (with tiny
stand-in models in place of ViT-L/14 and ViT-B, so nothing is downloaded) that take a training step."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipdistill.config import RunConfig, load_config
from clipdistill.data.paper import SUITES
from clipdistill.methods import build_task
from clipdistill.models.factory import create_student, create_teacher, load_model_config
from clipdistill.models.heads import comkd_settings
from clipdistill.train import make_optimizer

PAPER = Path(__file__).parents[1] / "configs" / "paper"
CID = PAPER / "cid_vitl14_to_vitb32.yaml"
COMKD = PAPER / "comkd_vitl14_to_vitb16.yaml"
PROMPTKD = PAPER / "promptkd_baseline.yaml"
TINY = (
    "--teacher.name", "lab-student-tiny", "--teacher.pretrained", "random",
    "--student.name", "lab-student-tiny", "--student.pretrained", "",
    "--train.device", "cpu", "--embed.device", "cpu", "--eval.device", "cpu",
    "--comkd.student_vpt_depth", "1", "--comkd.attention_heads", "1",  # the tiny student has one block
)  # fmt: skip
DIM, ROWS = 32, 16  # the tiny models' embedding width; rows of the stand-in teacher cache
# PromptKD's KD weight 200 (scripts/promptkd/base2new_train.sh); 1000 elsewhere, DTD included
KD_200 = {"fgvc_aircraft", "oxford_flowers"}
# CoOp's train split sizes: the steps of the per-dataset table are 20 epochs of N // 8 batches
N_TRAIN = {
    "imagenet": 1281167, "caltech101": 4128, "oxford_pets": 2944, "stanford_cars": 6509,
    "oxford_flowers": 4093, "food101": 50500, "fgvc_aircraft": 3334, "sun397": 15880, "dtd": 2820,
    "eurosat": 13500, "ucf101": 7639,
}  # fmt: skip
N_CLASSES = {
    "imagenet": 1000, "caltech101": 100, "oxford_pets": 37, "stanford_cars": 196, "oxford_flowers": 102,
    "food101": 101, "fgvc_aircraft": 100, "sun397": 397, "dtd": 47, "eurosat": 10, "ucf101": 101,
}  # fmt: skip


def dataset_rows(recipe: Path) -> dict[str, list[str]]:
    """The per-dataset override table in a recipe's header: dataset -> `--section.key value` list."""
    rows = {}
    for line in recipe.read_text().splitlines():
        match = re.match(r"#\s+(\w+)\s+[\d,]+\s+(--.*)$", line)
        if match:
            rows[match.group(1)] = match.group(2).split()
    return rows


def stage1_rows(recipe: Path) -> dict[str, tuple[int, int, list[str]]]:
    """The stage-1 table in a recipe's header: dataset -> (classes, base classes, overrides)."""
    rows = {}
    for line in recipe.read_text().splitlines():
        match = re.match(r"#\s+(\w+)\s+(\d+)\s+(\d+)\s+(--.*)$", line)
        if match:
            rows[match.group(1)] = (int(match.group(2)), int(match.group(3)), match.group(4).split())
    return rows


class StandInCache(SimpleNamespace):
    """What the methods read of a teacher cache: its widths (`meta`) and length."""

    def __len__(self) -> int:
        return ROWS


def build(
    recipe: Path, run_dir: Path, *extra: str
) -> tuple[RunConfig, torch.nn.Module, torch.optim.Optimizer]:
    """The recipe with tiny models, its stage outputs faked in `run_dir`: (config, task, optimiser)."""
    cfg = load_config(str(recipe), ["--run_dir", str(run_dir), *TINY, *extra])
    rng = np.random.default_rng(0)
    if cfg.train.method == "cid":  # what `cluster` writes
        (run_dir / cfg.cid.clusters).mkdir(parents=True)
        centroids = F.normalize(torch.randn(8, DIM), dim=-1).numpy()
        np.save(run_dir / cfg.cid.clusters / "centroids.npy", centroids)
        np.save(run_dir / cfg.cid.clusters / "labels.npy", rng.integers(0, 8, ROWS))
    else:  # stage 1's text bank of 5 classes
        (run_dir / cfg.comkd.prompt_teacher).mkdir(parents=True)
        bank = F.normalize(torch.randn(5, DIM), dim=-1).numpy()
        np.save(run_dir / cfg.comkd.prompt_teacher / "text_bank.npy", bank)
    create_teacher(cfg.teacher)  # the teacher only fills the cache: built, frozen, never trained here
    student = create_student(cfg.student)
    cache = StandInCache(meta=SimpleNamespace(image_dim=DIM, text_dim=DIM, views=1, ensemble=[]))
    task = build_task(cfg, student.model, cache)
    return cfg, task, make_optimizer(task, cfg.train)


def training_step(task: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    tokens = torch.randint(1, 100, (4, 16))
    batch = {
        "image": torch.randn(4, 3, 32, 32),
        "text": tokens,
        "index": torch.arange(4),
        "cache_row": torch.arange(4),
        "teacher_image": F.normalize(torch.randn(4, DIM), dim=-1),
        "teacher_text": F.normalize(torch.randn(4, DIM), dim=-1),
    }
    parts = task(batch)
    parts["loss"].backward()
    optimizer.step()
    return parts


def test_every_recipe_is_tested():
    assert sorted(p.name for p in PAPER.glob("*.yaml")) == sorted(p.name for p in (CID, COMKD, PROMPTKD))


def test_cid_recipe(tmp_path):
    cfg, task, optimizer = build(CID, tmp_path)
    assert cfg.data.kind == "webdataset" and cfg.train.method == "cid" and cfg.cluster.n_clusters == 1_000_000
    assert cfg.train.batch_size % (cfg.train.accum_steps * 8) == 0  # 8 GPUs
    assert cfg.train.steps == round(225e6 * 32 / cfg.train.batch_size)  # 32 epochs of LAION-225M
    assert "torchrun --nproc_per_node 8 -m clipdistill.cli train" in CID.read_text()
    assert isinstance(optimizer, torch.optim.AdamW)
    parts = training_step(task, optimizer)
    assert torch.isfinite(parts["loss"]) and parts["cd"] > 0 and parts["id"] > 0


@pytest.mark.parametrize("recipe", [COMKD, PROMPTKD], ids=["comkd", "promptkd"])
def test_comkd_recipes_have_promptkd_hyperparameters(recipe, tmp_path):
    cfg, task, optimizer = build(recipe, tmp_path)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    assert (cfg.train.lr, cfg.train.batch_size, cfg.comkd.temperature) == (0.005, 8, 1.0)
    settings = comkd_settings(cfg)
    if recipe == PROMPTKD:  # the baseline: refinement KD only
        assert cfg.train.method == "promptkd" and not settings.use_ifalign and not settings.use_eduattention
    else:
        assert cfg.train.method == "comkd" and settings.use_ifalign and settings.use_eduattention
    # PromptKD's KD reduction and student (prompts in 9 blocks, frozen tower) in both rows, so they
    # differ in IFAlign and EduAttention only
    recipe_cfg = load_config(str(recipe)).comkd
    assert recipe_cfg.kd_reduction == "promptkd" and recipe_cfg.freeze_backbone
    assert (recipe_cfg.student_vpt_depth, recipe_cfg.student_vpt_tokens) == (9, 4)
    if recipe == COMKD:  # the paper's modules: IFAlign's L1 norms, the cross-attention
        assert (recipe_cfg.ifalign_reduction, recipe_cfg.eduattention) == ("sum", "cross")
    trainable = {name for name, _ in task.trainable_parameters()}
    assert "visual_prompts.prompts" in trainable and not any(n.startswith("model.") for n in trainable)
    parts = training_step(task, optimizer)
    assert torch.isfinite(parts["loss"]) and parts["kd"] >= 0


@pytest.mark.parametrize("recipe", [COMKD, PROMPTKD], ids=["comkd", "promptkd"])
def test_per_dataset_rows(recipe, tmp_path):
    rows = dataset_rows(COMKD)  # the baseline points at ComKD's table
    assert list(rows) == SUITES["base_to_novel"]  # every dataset, in the papers' order
    for dataset, overrides in rows.items():
        cfg = load_config(str(recipe), ["--run_dir", str(tmp_path), *overrides])
        epoch = N_TRAIN[dataset] // 8
        assert (cfg.train.steps, cfg.train.warmup_steps) == (20 * epoch, epoch), dataset
        assert cfg.comkd.lambda_kd == (200.0 if dataset in KD_200 else 1000.0), dataset
    default = load_config(str(recipe))
    assert (default.train.steps, default.comkd.lambda_kd) == (20 * (N_TRAIN["imagenet"] // 8), 1000.0)


def test_stage1_rows(tmp_path):
    """Stage 1 of every dataset: 20 epochs of 16 shots of each base class (the first half) in batches of 4."""
    rows = stage1_rows(COMKD)
    assert list(rows) == SUITES["base_to_novel"]
    stage1 = ["--train.role", "teacher", "--train.method", "prompt_teacher", "--train.name", "prompt_teacher"]
    for dataset, (classes, base, overrides) in rows.items():
        assert classes == N_CLASSES[dataset] and base == -(-classes // 2), dataset
        cfg = load_config(
            str(COMKD), ["--run_dir", str(tmp_path), "--data.dataset", dataset, *stage1, *overrides]
        )
        epoch = base * cfg.data.shots // 4
        assert (cfg.train.steps, cfg.train.warmup_steps) == (20 * epoch, epoch), dataset
    cfg = load_config(str(COMKD))
    assert (cfg.data.kind, cfg.data.shots) == ("paper", 16)
    assert "--train.lr 0.0025 --train.batch_size 4 STAGE1" in COMKD.read_text()


@pytest.mark.parametrize("recipe", [CID, COMKD, PROMPTKD], ids=["cid", "comkd", "promptkd"])
def test_recipe_models_are_the_papers(recipe):
    """The real model names resolve to open_clip configs of the stated sizes (configs only: no weights)."""
    cfg = load_config(str(recipe))
    names = ("ViT-L-14", "ViT-B-32") if recipe == CID else ("ViT-L-14-quickgelu", "ViT-B-16-quickgelu")
    assert (cfg.teacher.name, cfg.student.name) == names
    teacher, student = load_model_config(cfg.teacher.name), load_model_config(cfg.student.name)
    assert teacher["vision_cfg"]["patch_size"] == 14 and teacher["vision_cfg"]["width"] == 1024
    assert student["vision_cfg"]["patch_size"] == (32 if recipe == CID else 16)
    assert student["vision_cfg"]["width"] == 768
    assert teacher.get("quick_gelu", False) == (recipe != CID)  # OpenAI weights need QuickGELU
