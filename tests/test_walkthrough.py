"""The walk-throughs on your own data, run command by command as they are written: the README's (a table
of generated images and captions, every stage from embed to predict) and docs/recipes.md's ComKD on a
folder of labelled images, each with a tiny teacher in a Hugging Face cache made here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from huggingface_hub import constants

from clipdistill.checkpoint import read_json
from clipdistill.cli import main as cli_main
from own_data import CLASSES, REVISION, draw_shape, hf_cache, tiny_model, tiny_model_config, write_table

README = Path(__file__).parents[1] / "README.md"
RECIPES = Path(__file__).parents[1] / "docs" / "recipes.md"
REPO = "someorg/tiny-clip"
# mydata.yaml as the README shows it, at test scale: a tiny teacher and student, a few CPU steps
CONFIG = f"""
run_dir: runs/mine
data:
  kind: csv
  path: data/pairs.csv
  image_key: filepath
  caption_key: title
teacher:
  name: hf-hub:{REPO}
student:
  name: lab-student-tiny
train:
  steps: 6
  batch_size: 16
  warmup_steps: 2
  log_every: 2
  device: cpu
embed:
  batch_size: 32
  device: cpu
eval:
  device: cpu
balance:
  n_clusters: 3
  tau_p: 0.99999
  keep_ratio: 0.5
cluster:
  n_clusters: 3
"""


def commands(doc: Path, heading: str) -> list[list[str]]:
    """The `clipdistill ...` lines of the bash block in section `heading` of `doc`, in order."""
    section = doc.read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = [line for line in block.splitlines() if line.startswith("clipdistill ")]
    return [shlex.split(line, comments=True)[1:] for line in lines]


def readme_commands() -> list[list[str]]:
    """The `clipdistill ...` lines of the README's "Your own data" section, in order."""
    return commands(README, "## Your own data")


def hf_teacher(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny teacher `hf-hub:REPO` in a Hugging Face cache under `folder`, read offline."""
    cache = hf_cache(folder, REPO, tiny_model(), tiny_model_config(), "open_clip_model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The user's folder: data/pairs.csv (+ images), data/labelled.csv, data/classes.txt, photos/,
    mydata.yaml, and the teacher in a Hugging Face cache (offline)."""
    write_table(tmp_path / "data", per_class=16, seed=0)
    held_out = pd.read_csv(write_table(tmp_path / "data" / "held_out", per_class=6, seed=1))
    held_out["filepath"] = "held_out/" + held_out["filepath"]
    held_out.to_csv(tmp_path / "data" / "labelled.csv", index=False)
    (tmp_path / "photos").mkdir()
    for i, name in enumerate(CLASSES):
        draw_shape(name, np.random.default_rng(10 + i)).save(tmp_path / "photos" / f"{i}.png")
    (tmp_path / "mydata.yaml").write_text(CONFIG)
    hf_teacher(tmp_path / "hf", monkeypatch)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_walkthrough_runs_end_to_end(workdir, capsys):
    commands = readme_commands()
    stages = [c[0] for c in commands]
    assert stages == ["embed", "balance", "cluster", "train", "eval", "eval", "export", "predict"]
    for args in commands:
        code = cli_main(args)
        out = capsys.readouterr()
        assert code == 0, f"{shlex.join(args)}: {out.err[-2000:]}"
    run = workdir / "runs" / "mine"
    report = read_json(run / "cache" / "report.json")
    assert report["teacher"] == f"hf-hub:{REPO}@{REVISION}" and report["valid_samples"] == 48
    assert read_json(run / "cid" / "done.json")["steps"] == 6
    # the evaluations are named after the table they scored (data/labelled.csv)
    student, teacher = (read_json(run / name / "eval_labelled.json") for name in ("cid", "teacher"))
    for metrics in (student, teacher):
        assert metrics["classes"] == 3 and metrics["test_images"] == 9
        assert 0 <= metrics["zeroshot_top1"] <= 100 and metrics["retrieval_rule"] == "instance"
        assert "linear_probe_top1" in metrics
    assert (run / "cid" / "eval_labelled.md").is_file() and (run / "cid" / "export" / "open_clip").is_dir()
    lines = out.out.splitlines()
    assert [Path(line.split()[0]).name for line in lines[1:]] == ["0.png", "1.png", "2.png"]
    assert all(line.split()[1] in " ".join(CLASSES) for line in lines[1:])


# myimages.yaml as docs/recipes.md shows it, at test scale
IMAGES_CONFIG = f"""
run_dir: runs/myimages
data:
  kind: paper
  dataset: image_folder
  path: data/images
  shots: 4
teacher:
  name: hf-hub:{REPO}
student:
  name: lab-student-tiny
train:
  steps: 3
  batch_size: 6
  warmup_steps: 1
  device: cpu
embed:
  device: cpu
eval:
  device: cpu
"""


def test_the_comkd_recipe_on_a_folder_of_labelled_images_runs_end_to_end(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 8), ("test", 3)):
        for name in CLASSES:
            folder = tmp_path / "data" / "images" / split / name.replace(" ", "_")
            folder.mkdir(parents=True)
            for i in range(per_class):
                draw_shape(name, rng).save(folder / f"{i}.png")
    (tmp_path / "photos").mkdir()
    for i, name in enumerate(CLASSES):
        draw_shape(name, rng).save(tmp_path / "photos" / f"{i}.png")
    (tmp_path / "classes.txt").write_text("".join(f"{name}\n" for name in CLASSES))  # not the bank's order
    (tmp_path / "myimages.yaml").write_text(IMAGES_CONFIG)
    hf_teacher(tmp_path / "hf", monkeypatch)
    monkeypatch.chdir(tmp_path)

    steps = commands(RECIPES, "## ComKD-CLIP on your own labelled images")
    assert [c[0] for c in steps] == ["train", "embed", "train", "eval", "predict", "export"]
    for args in steps:
        code = cli_main(args)
        out = capsys.readouterr()
        assert code == 0, f"{shlex.join(args)}: {out.err[-2000:]}"
        if args[0] == "predict":
            table = out.out.splitlines()
    run = tmp_path / "runs" / "myimages"
    split = read_json(run / "prompt_teacher" / "split.json")
    assert split["classnames"] == sorted(CLASSES) and split["base"] == [0, 1]  # the folders, sorted
    assert read_json(run / "prompt_teacher" / "done.json")["train_samples"] == 2 * 4  # base x shots
    assert read_json(run / "comkd" / "done.json")["train_samples"] == 3 * 8  # every train image
    metrics = read_json(run / "comkd" / "eval_images.json")
    assert metrics["classifier"] == "comkd_head" and metrics["test_images"] == 9 and "note" not in metrics
    assert [Path(line.split()[0]).name for line in table[1:]] == ["0.png", "1.png", "2.png"]
    assert all(line.split()[1] in " ".join(CLASSES) for line in table[1:])
    spec = read_json(run / "comkd" / "export" / "onnx" / "preprocess.json")
    assert spec["head"]["classnames"] == split["classnames"]
    # every class labelled, none held out as novel: both stages run
    every = ["--config", "myimages.yaml", "--comkd.base_fraction", "1", "--comkd.prompt_teacher", "pt_all"]
    stage1 = ["--train.role", "teacher", "--train.method", "prompt_teacher", "--train.name", "pt_all"]
    assert cli_main(["train", *every, *stage1]) == 0, capsys.readouterr().err[-2000:]
    assert read_json(run / "pt_all" / "split.json")["base"] == [0, 1, 2]
    assert read_json(run / "pt_all" / "done.json")["train_samples"] == 3 * 4
    assert cli_main(["train", *every, "--train.method", "comkd", "--train.name", "kd_all"]) == 0
