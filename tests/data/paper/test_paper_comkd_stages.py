"""`data.kind paper` through ComKD's stages on tiny CoOp-layout datasets, with the paper recipe's commands:
stage 1 (prompt_teacher) -> embed -> stage 2 (comkd) per dataset, then `eval --suite base_to_novel`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from paper_fixtures import write_split_dataset

import clipdistill.data.paper as paper
from clipdistill.cli import main
from clipdistill.data.paper.coop import SPLIT_FILE_DATASETS

CLASSES = {
    "oxford_pets": ["abyssinian", "boxer", "great_pyrenees", "pug"],
    "dtd": ["banded", "dotted", "striped"],
}
TRAIN_PER_CLASS, SHOTS = 3, 2
TINY = [
    "--teacher.name", "lab-student-tiny", "--teacher.pretrained", "random",
    "--student.name", "lab-student-tiny", "--student.pretrained", "",
    "--train.device", "cpu", "--embed.device", "cpu", "--eval.device", "cpu",
]  # fmt: skip


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "datasets"
    for name, classes in CLASSES.items():
        spec = SPLIT_FILE_DATASETS[name]
        counts = {"train": TRAIN_PER_CLASS, "val": 1, "test": 2}
        write_split_dataset(root / spec.folder, spec.images, spec.split_file, classes, counts)
    monkeypatch.setitem(paper.SUITES, "base_to_novel", list(CLASSES))
    return root


def clipdistill(stage: str, run_dir: Path, root: Path, dataset: str, *extra: str) -> None:
    data = ["--data.kind", "paper", "--data.dataset", dataset, "--data.path", str(root)]
    assert main([stage, "--run_dir", str(run_dir), *data, "--data.shots", str(SHOTS), *TINY, *extra]) == 0


def stage1(run_dir: Path, root: Path, dataset: str, *extra: str) -> None:
    stage = ["--train.role", "teacher", "--train.method", "prompt_teacher", "--train.name", "prompt_teacher"]
    clipdistill(
        "train", run_dir, root, dataset, *stage, "--train.steps", "2", "--train.batch_size", "2", *extra
    )


def stage2(run_dir: Path, root: Path, dataset: str, *extra: str) -> None:
    clipdistill("train", run_dir, root, dataset, "--train.method", "comkd", "--train.steps", "2",
                "--train.batch_size", "4", *extra)  # fmt: skip


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_stage1_embed_stage2_and_the_base_to_novel_suite(tmp_path, root):
    runs = tmp_path / "runs"
    for dataset, classes in CLASSES.items():
        run_dir = runs / dataset
        stage1(run_dir, root, dataset)
        clipdistill("embed", run_dir, root, dataset)
        stage2(run_dir, root, dataset)

        n_base = math.ceil(len(classes) / 2)
        names = paper.build_dataset(dataset, root, "train", None).classnames
        split = read_json(run_dir / "prompt_teacher" / "split.json")
        assert split["classnames"] == names  # every class, in the dataset's order
        assert split["base"] == list(range(n_base))  # CoOp's first half, as the suite scores it
        assert np.load(run_dir / "prompt_teacher" / "text_bank.npy").shape == (len(classes), 32)
        # stage 1 learns from the few-shot labelled images of the base classes; stage 2 from every image
        assert read_json(run_dir / "prompt_teacher" / "done.json")["train_samples"] == n_base * SHOTS
        assert read_json(run_dir / "comkd" / "done.json")["train_samples"] == len(classes) * TRAIN_PER_CLASS

    assert main(["eval", "--run_dir", str(runs), *TINY, "--eval.model", "{dataset}/comkd",
                 "--suite", "base_to_novel", "--eval.suite_root", str(root)]) == 0  # fmt: skip
    result = read_json(runs / "suite_base_to_novel.json")
    assert [row["dataset"] for row in result["rows"]] == list(CLASSES)
    for row in [*result["rows"], result["average"]]:
        assert 0 <= row["base_acc"] <= 100 and 0 <= row["novel_acc"] <= 100 and np.isfinite(row["hm"])


def test_visual_prompts_and_the_inductive_variant(tmp_path, root):
    """Stage 1 with deep visual prompts writes its feature of every train image (cache row order), which
    stage 2 reads; the inductive stage 2 keeps the images of base classes only."""
    run_dir = tmp_path / "run"
    stage1(run_dir, root, "oxford_pets", "--comkd.vpt_depth", "1", "--comkd.vpt_tokens", "2")
    features = np.load(run_dir / "prompt_teacher" / "image_features.npy")
    assert features.shape == (4 * TRAIN_PER_CLASS, 32) and np.allclose(
        np.linalg.norm(features, axis=1), 1, atol=1e-2
    )
    clipdistill("embed", run_dir, root, "oxford_pets")
    stage2(run_dir, root, "oxford_pets", "--comkd.inductive", "true")
    assert read_json(run_dir / "comkd" / "done.json")["train_samples"] == 2 * TRAIN_PER_CLASS
