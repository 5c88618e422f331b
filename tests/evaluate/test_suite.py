"""`eval --suite`: a tiny model over tiny CoOp-layout datasets, one table in the papers' row order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import clipdistill.data.paper as paper
from clipdistill.checkpoint import save_state_dict
from clipdistill.cli import main
from clipdistill.config import ComkdConfig, ConfigError, RunConfig, load_config, to_dict
from clipdistill.data.paper.coop import SPLIT_FILE_DATASETS
from clipdistill.data.sources import pil_transform
from clipdistill.evaluate.protocols import harmonic_mean
from clipdistill.evaluate.suite import dataset_features, run_suite
from clipdistill.models.classifier import TrainedClassifier
from clipdistill.models.factory import create_model
from clipdistill.models.heads import SPLIT, TEXT_BANK, ComkdHead

# Per dataset: class names; every class is one solid colour, so its images share one feature.
CLASSES = {
    "oxford_pets": ["abyssinian", "boxer", "pug", "great_pyrenees"],  # base 2, new 2
    "dtd": ["banded", "dotted", "striped"],  # base 2 (ceil), new 1
}
COLOURS = [(230, 20, 20), (20, 200, 30), (30, 40, 220), (240, 240, 20), (200, 30, 220)]
TINY = [
    "--teacher.name", "lab-student-tiny", "--teacher.pretrained", "random",
    "--student.name", "lab-student-tiny", "--eval.device", "cpu",
]  # fmt: skip


def write_coop_dataset(root: Path, name: str, per_split: int = 2) -> None:
    """CoOp's layout of a split-file dataset: images plus split_zhou_*.json of [path, label, name]."""
    spec = SPLIT_FILE_DATASETS[name]
    images = root / spec.folder / spec.images
    images.mkdir(parents=True)
    split = {}
    for part in ("train", "val", "test"):
        entries = []
        for label, classname in enumerate(CLASSES[name]):
            for i in range(per_split):
                file = f"{classname}_{part}_{i}.png"
                Image.new("RGB", (12, 12), COLOURS[label]).save(images / file)
                entries.append([file, label, classname])
        split[part] = entries
    (root / spec.folder / spec.split_file).write_text(json.dumps(split))


@pytest.fixture
def suite_root(tmp_path, monkeypatch) -> Path:
    """Two tiny datasets under one root, standing in for every suite (in this order)."""
    root = tmp_path / "datasets"
    for name in CLASSES:
        write_coop_dataset(root, name)
    for suite in paper.SUITES:
        monkeypatch.setitem(paper.SUITES, suite, list(CLASSES))
    return root


def config(run_dir: Path, root: Path, *extra: str) -> RunConfig:
    return load_config(None, ["--run_dir", str(run_dir), *TINY, "--eval.suite_root", str(root), *extra])


def save_trained(folder: Path, cfg: RunConfig, model: torch.nn.Module) -> None:
    """A run folder as `train` leaves it: weights and the resolved config."""
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict(model.state_dict(), folder / "model.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def prompt_teacher(run_dir: Path, root: Path, name: str = "prompt_teacher") -> Path:
    """A prompt-tuned teacher whose text bank is each class's own image feature (so every test image is
    classified right) with its rows in reverse order: right answers need the lookup by class name."""
    cfg = config(run_dir, root, "--train.role", "teacher", "--train.method", "prompt_teacher")
    torch.manual_seed(0)
    folder = run_dir / name
    save_trained(folder, cfg, create_model(cfg.teacher).model)
    scorer = TrainedClassifier(cfg, name, torch.device("cpu"))
    names, rows = [], []
    for dataset in CLASSES:
        test = paper.build_dataset(dataset, root, "test", pil_transform(scorer.loaded.preprocess))
        feats, labels, _ = dataset_features(scorer, test, 8, 0, dataset)
        for label, classname in enumerate(test.classnames):
            names.append(classname)
            rows.append(feats[labels == label].mean(0))
    np.save(folder / TEXT_BANK, torch.stack(rows[::-1]).numpy())
    (folder / SPLIT).write_text(json.dumps({"classnames": names[::-1], "base": [], "novel": []}))
    return folder


def comkd_student(run_dir: Path, root: Path, dataset: str) -> None:
    """`<run_dir>/<dataset>/comkd`: a ComKD student of one dataset with its head and stage-1 split.json."""
    own = run_dir / dataset
    cfg = config(own, root, "--train.method", "comkd")
    model = create_model(cfg.student).model
    save_trained(own / "comkd", cfg, model)
    classnames = [c.replace("_", " ") for c in CLASSES[dataset]]
    head = ComkdHead(int(model.visual.output_dim), torch.randn(len(classnames), 32), ComkdConfig())
    save_state_dict(
        {f"head.{k}": v for k, v in head.state_dict().items()}, own / "comkd" / "heads.safetensors"
    )
    (own / "prompt_teacher").mkdir()
    (own / "prompt_teacher" / SPLIT).write_text(json.dumps({"classnames": classnames}))


def test_base_to_novel_table(tmp_path, suite_root):
    run_dir = tmp_path / "run"
    prompt_teacher(run_dir, suite_root)
    result = run_suite(
        config(run_dir, suite_root, "--eval.suite", "base_to_novel", "--eval.model", "prompt_teacher")
    )

    assert [r["dataset"] for r in result["rows"]] == list(CLASSES)  # the suite's order
    assert [r["title"] for r in result["rows"]] == ["OxfordPets", "DTD"]
    for row in result["rows"]:  # the bank holds each class's own feature: all right
        assert row["base_acc"] == row["novel_acc"] == row["hm"] == 100.0
    assert result["average"] == {"base_acc": 100.0, "novel_acc": 100.0, "hm": 100.0}
    folder = run_dir / "prompt_teacher"
    assert json.loads((folder / "suite_base_to_novel.json").read_text()) == result
    table = (folder / "suite_base_to_novel.md").read_text().splitlines()
    assert table[2] == "| Dataset | Base | Novel | HM |"
    assert [line.split(" | ")[0] for line in table[4:]] == ["| OxfordPets", "| DTD", "| **Average**"]


def test_average_row_and_other_suites(tmp_path, suite_root, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = config(run_dir, suite_root, "--train.role", "teacher")
    torch.manual_seed(1)
    save_trained(run_dir / "clip", cfg, create_model(cfg.teacher).model)  # zero-shot through its text tower

    b2n = run_suite(config(run_dir, suite_root, "--eval.suite", "base_to_novel", "--eval.model", "clip"))
    base = np.mean([r["base_acc"] for r in b2n["rows"]])
    novel = np.mean([r["novel_acc"] for r in b2n["rows"]])
    assert b2n["average"]["hm"] == pytest.approx(harmonic_mean(base, novel))  # HM of the means, as printed
    for row in b2n["rows"]:
        assert row["hm"] == pytest.approx(harmonic_mean(row["base_acc"], row["novel_acc"]))

    monkeypatch.setitem(paper.SUITES, "domain_generalization", ["dtd", "oxford_pets"])
    monkeypatch.setattr("clipdistill.evaluate.suite.SOURCE_DATASETS", {"domain_generalization": ("dtd",)})
    dg = run_suite(
        config(run_dir, suite_root, "--eval.suite", "domain_generalization", "--eval.model", "clip")
    )
    assert [r["dataset"] for r in dg["rows"]] == ["dtd", "oxford_pets"]
    assert dg["average"] == {"top1": dg["rows"][1]["top1"]}  # the source is not averaged
    assert (
        "leaves out the source dataset (DTD)"
        in (run_dir / "clip" / "suite_domain_generalization.md").read_text()
    )

    probe = run_suite(config(run_dir, suite_root, "--eval.suite", "linear_probe", "--eval.model", "clip"))
    assert all(r["linear_probe_top1"] == 100.0 for r in probe["rows"])  # one colour per class: separable


def test_one_comkd_student_per_dataset(tmp_path, suite_root):
    run_dir = tmp_path / "run"
    for dataset in CLASSES:
        comkd_student(run_dir, suite_root, dataset)
    result = run_suite(
        config(run_dir, suite_root, "--eval.suite", "cross_dataset", "--eval.model", "{dataset}/comkd")
    )
    assert [r["model"] for r in result["rows"]] == ["oxford_pets/comkd", "dtd/comkd"]
    assert all(0.0 <= r["top1"] <= 100.0 for r in result["rows"])
    assert (run_dir / "suite_cross_dataset.json").is_file() and (run_dir / "suite_cross_dataset.md").is_file()

    # a bank written without split.json is read in the dataset's own class order
    (run_dir / "dtd" / "prompt_teacher" / SPLIT).unlink()
    again = run_suite(
        config(run_dir, suite_root, "--eval.suite", "cross_dataset", "--eval.model", "{dataset}/comkd")
    )
    assert again["rows"] == result["rows"]

    # one dataset's student cannot score another dataset's classes
    with pytest.raises(ConfigError, match="not in the model's text bank"):
        run_suite(
            config(run_dir, suite_root, "--eval.suite", "cross_dataset", "--eval.model", "oxford_pets/comkd")
        )


def test_missing_datasets_are_all_named_before_any_work(tmp_path, suite_root, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setitem(paper.SUITES, "base_to_novel", ["imagenet", "oxford_pets", "eurosat"])
    monkeypatch.setattr(TrainedClassifier, "__init__", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError) as error:
        run_suite(config(run_dir, suite_root, "--eval.suite", "base_to_novel", "--eval.model", "teacher"))
    message = str(error.value)
    assert "2 of 3 datasets cannot be read" in message
    assert str(suite_root / "imagenet") in message and str(suite_root / "eurosat") in message
    assert not list(run_dir.rglob("suite_*"))


def test_missing_model_and_unknown_suite(tmp_path, suite_root):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="no trained model at"):
        run_suite(config(run_dir, suite_root, "--eval.suite", "base_to_novel", "--eval.model", "nope"))
    with pytest.raises(ConfigError, match="eval.suite: 'b2n' is not one of"):
        run_suite(config(run_dir, suite_root, "--eval.suite", "b2n", "--eval.model", "teacher"))
    with pytest.raises(ConfigError, match="needs eval.suite_root"):
        run_suite(load_config(None, ["--run_dir", str(run_dir), "--eval.suite", "base_to_novel"]))


def test_cli_suite_flag(tmp_path, suite_root, capsys):
    run_dir = tmp_path / "run"
    args = ["--run_dir", str(run_dir), *TINY, "--eval.model", "teacher", "--eval.suite_root", str(suite_root)]
    assert main(["eval", "--suite", "base_to_novel", *args]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["suite"] == "base_to_novel" and len(printed["rows"]) == 2
    assert (run_dir / "teacher" / "suite_base_to_novel.md").is_file()

    assert main(["eval", "--suite", "base_to_novel", *args[:-1], str(tmp_path / "nowhere")]) == 2
    assert "cannot be read" in capsys.readouterr().err
