"""`clipdistill eval` on a user's own labelled images: a table or a folder tree, any model kind."""

from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from clipdistill.checkpoint import read_json, save_state_dict, write_json
from clipdistill.config import ComkdConfig, ConfigError, load_config, to_dict
from clipdistill.evaluate.own_data import _features, read_labelled
from clipdistill.evaluate.run import run_eval
from clipdistill.models.classifier import TrainedClassifier
from clipdistill.models.factory import create_model
from clipdistill.models.heads import SPLIT, TEXT_BANK, ComkdHead
from own_data import CLASSES, open_clip_folder, tiny_model, tiny_model_config, write_table

NAMES = list(CLASSES)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_table(tmp_path_factory.mktemp("own"), per_class=8)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return open_clip_folder(
        tmp_path_factory.mktemp("t") / "oc", tiny_model(), tiny_model_config(), "open_clip_model.safetensors"
    )


def _args(run_dir, table, *extra):
    return [
        "--run_dir", str(run_dir), "--data.kind", "csv", "--data.path", str(table),
        "--data.label_key", "label", "--eval.device", "cpu", "--eval.batch_size", "16", *extra,
    ]  # fmt: skip


def test_teacher_on_a_labelled_table(tmp_path, data, teacher_dir):
    cfg = load_config(
        None, _args(tmp_path, data, "--eval.model", "teacher", "--teacher.name", f"local-dir:{teacher_dir}")
    )
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / ".eval_pairs.csv.killed.tmp").write_text("half")  # a killed eval's leftover
    write_json(tmp_path / "teacher" / "eval.json", {"zeroshot_top1": 87.0})  # its lab results, say
    metrics = run_eval(cfg)
    assert not list((tmp_path / "teacher").glob(".*.tmp"))
    assert read_json(tmp_path / "teacher" / "eval.json") == {"zeroshot_top1": 87.0}  # named after pairs.csv
    assert metrics["classifier"] == "zeroshot" and metrics["classes"] == 3
    assert metrics["test_images"] == 12 and metrics["train_images"] == 12  # the seeded half
    for key in (
        "zeroshot_top1",
        "zeroshot_top5",
        "linear_probe_top1",
        "retrieval_i2t_r1",
        "retrieval_t2i_r10",
    ):
        assert 0.0 <= metrics[key] <= 100.0, key
    assert metrics["zeroshot_top5"] == 100.0  # 3 classes
    assert metrics["retrieval_rule"] == "instance"
    assert metrics["retrieval_i2t_r10"] >= metrics["retrieval_i2t_r5"] >= metrics["retrieval_i2t_r1"]
    folder = tmp_path / "teacher"
    assert read_json(folder / "eval_pairs.json") == metrics
    assert list(csv.DictReader(open(folder / "eval_pairs.csv")))[0]["model"] == "teacher"
    assert "| zeroshot_top1 |" in (folder / "eval_pairs.md").read_text()

    # class numbers + a class-names file, names in another order, a TSV and a Parquet copy: same numbers
    table = pd.read_csv(data)
    (tmp_path / "names.json").write_text(
        json.dumps({"classnames": NAMES[::-1], "templates": ["a photo of a {c}."]})
    )
    numbered = table.assign(label=table["label"].map({n: i for i, n in enumerate(NAMES[::-1])}))
    numbered.to_csv(data.parent / "numbered.tsv", sep="\t", index=False)
    table.to_parquet(data.parent / "pairs.parquet")
    for path, extra in (
        (data.parent / "numbered.tsv", ["--data.classnames", str(tmp_path / "names.json")]),
        (data.parent / "pairs.parquet", []),
    ):
        again = run_eval(
            load_config(
                None,
                _args(
                    tmp_path,
                    path,
                    *extra,
                    "--eval.model",
                    "teacher",
                    "--teacher.name",
                    f"local-dir:{teacher_dir}",
                ),
            )
        )
        for key in ("zeroshot_top1", "linear_probe_top1", "retrieval_t2i_r1"):
            assert again[key] == pytest.approx(metrics[key]), (path, key)


def test_the_tables_split_column_and_a_folder_tree(tmp_path, teacher_dir):
    table = write_table(tmp_path / "d", per_class=8, split=True)
    cfg = load_config(
        None, _args(tmp_path, table, "--eval.model", "teacher", "--teacher.name", f"local-dir:{teacher_dir}")
    )
    data = read_labelled(cfg)
    assert (data.split == "test").sum() == 6  # every 4th row of the table
    assert run_eval(cfg)["test_images"] == 6
    folder = load_config(None, _args(tmp_path, tmp_path / "d" / "images", "--data.kind", "folder"))
    data = read_labelled(folder)
    assert data.classnames == sorted(NAMES) and len(data.files) == 24 and data.captions is None
    metrics = run_eval(
        load_config(
            None,
            _args(
                tmp_path / "f",
                tmp_path / "d" / "images",
                "--data.kind",
                "folder",
                "--eval.model",
                "teacher",
                "--teacher.name",
                f"local-dir:{teacher_dir}",
            ),
        )
    )
    assert metrics["test_images"] == 12 and "retrieval_rule" not in metrics


def test_split_probe_and_protocol_options_are_not_ignored_on_your_own_images(tmp_path, data, teacher_dir):
    args = _args(tmp_path, data, "--eval.model", "teacher", "--teacher.name", f"local-dir:{teacher_dir}")
    test = run_eval(load_config(None, args))
    val = run_eval(load_config(None, [*args, "--eval.split", "val"]))
    assert 0 < val["val_images"] < 12 and "test_images" not in val
    assert not {"linear_probe_top1", "retrieval_i2t_r1"} & set(val)  # the test split's, as on the lab
    assert read_json(tmp_path / "teacher" / "eval_pairs_val.json") == val
    assert read_json(tmp_path / "teacher" / "eval_pairs.json") == test  # not replaced
    no_probe = run_eval(load_config(None, [*args, "--eval.linear_probe", "false"]))
    assert "linear_probe_top1" not in no_probe and "linear_probe_top1" in test
    assert no_probe["zeroshot_top1"] == test["zeroshot_top1"]
    with pytest.raises(ConfigError, match="eval.protocol base_to_novel scores the lab"):
        run_eval(load_config(None, [*args, "--eval.protocol", "base_to_novel"]))


def test_class_folders_are_matched_to_the_listed_names_by_name(tmp_path):
    write_table(tmp_path / "d", per_class=2)
    listed = ["red circle", "green square", "blue triangle"]  # not the folders' sorted order
    (tmp_path / "classes.txt").write_text("\n".join(listed))
    args = ["--data.kind", "folder", "--data.classnames", str(tmp_path / "classes.txt")]
    data = read_labelled(load_config(None, _args(tmp_path, tmp_path / "d" / "images", *args)))
    assert data.classnames == listed
    for file, label in zip(data.files, data.labels, strict=True):
        assert file.parent.name == listed[label].replace(" ", "_")
    (tmp_path / "codes.txt").write_text("\n".join(["z", "y", "x"]))  # other names: by sorted folder order
    args[-1] = str(tmp_path / "codes.txt")
    data = read_labelled(load_config(None, _args(tmp_path, tmp_path / "d" / "images", *args)))
    first = [f.parent.name for f, label in zip(data.files, data.labels, strict=True) if label == 0]
    assert first == ["blue_triangle"] * 2
    # one misnamed folder among matching ones would relabel every folder by sorted order: refused
    args[-1] = str(tmp_path / "classes.txt")
    (tmp_path / "d" / "images" / "red_circle").rename(tmp_path / "d" / "images" / "red_circel")
    with pytest.raises(
        ConfigError, match=r"class folders \['red_circel'\] match no name .* while 2 others do"
    ):
        read_labelled(load_config(None, _args(tmp_path, tmp_path / "d" / "images", *args)))


def test_a_split_folder_tree_is_whole_or_refused(tmp_path):
    write_table(tmp_path / "d", per_class=6)
    images = tmp_path / "d" / "images"
    for cls in sorted(p.name for p in images.iterdir()):  # 2 files each to train, val and test
        thirds = np.split(np.array(sorted((images / cls).iterdir())), 3)
        for part, files in zip(("train", "Val", "test"), thirds, strict=True):
            (tmp_path / "tree" / part / cls).mkdir(parents=True)
            for f in files:
                f.rename(tmp_path / "tree" / part / cls / f.name)
    folder = load_config(None, _args(tmp_path, tmp_path / "tree", "--data.kind", "folder"))
    data = read_labelled(folder)
    assert data.classnames == sorted(NAMES)
    assert {part: int((data.split == part).sum()) for part in ("train", "val", "test")} == {
        "train": 6, "val": 6, "test": 6}  # fmt: skip
    assert all(f.parent.parent.name.lower() == s for f, s in zip(data.files, data.split, strict=True))
    # without test/, "train" and "val" would be read as two classes of images
    (tmp_path / "tree" / "test").rename(tmp_path / "held_out")
    with pytest.raises(ConfigError, match=r"holds \['Val', 'train'\]; a split tree is train/ and test/"):
        read_labelled(folder)
    (tmp_path / "held_out").rename(tmp_path / "tree" / "test")
    (tmp_path / "tree" / "extra_class").mkdir()  # beside the split folders: would be ignored
    with pytest.raises(ConfigError, match="and nothing else"):
        read_labelled(folder)


def _save_run(folder, cfg, model):
    folder.mkdir(parents=True, exist_ok=True)
    save_state_dict(model.state_dict(), folder / "model.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def test_a_text_bank_is_looked_up_by_class_name(tmp_path, data):
    """A prompt-tuned teacher whose bank rows are each class's mean test feature, stored in reverse order:
    everything right only if the eval finds each class's row by name."""
    cfg = load_config(None, _args(tmp_path, data, "--eval.model", "pt", "--teacher.name", "lab-student-tiny",
                                  "--train.role", "teacher", "--train.method", "prompt_teacher"))  # fmt: skip
    torch.manual_seed(0)
    _save_run(tmp_path / "pt", cfg, create_model(cfg.teacher).model)
    scorer = TrainedClassifier(cfg, "pt")
    own = read_labelled(cfg)
    feats, rows, _ = _features(scorer, own, "test", cfg)
    labels = torch.tensor(own.labels)[rows]
    bank = torch.stack([feats[labels == c].mean(0) for c in range(3)])
    np.save(tmp_path / "pt" / TEXT_BANK, bank.flip(0).numpy())
    (tmp_path / "pt" / SPLIT).write_text(json.dumps({"classnames": own.classnames[::-1]}))
    metrics = run_eval(cfg)
    assert metrics["classifier"] == "text_bank" and metrics["zeroshot_top1"] == 100.0
    assert "note" not in metrics


def test_a_comkd_student_with_other_class_names_says_so(tmp_path, data, capsys):
    cfg = load_config(None, _args(tmp_path, data, "--eval.model", "kd", "--student.name", "lab-student-tiny",
                                  "--train.method", "comkd"))  # fmt: skip
    model = create_model(cfg.student).model
    _save_run(tmp_path / "kd", cfg, model)
    head = ComkdHead(int(model.visual.output_dim), torch.randn(3, 32), ComkdConfig())
    save_state_dict(
        {f"head.{k}": v for k, v in head.state_dict().items()}, tmp_path / "kd" / "heads.safetensors"
    )
    (tmp_path / "prompt_teacher").mkdir()
    (tmp_path / "prompt_teacher" / SPLIT).write_text(json.dumps({"classnames": ["cat", "dog", "bird"]}))
    metrics = run_eval(cfg)
    assert metrics["classifier"] == "comkd_head" and "retrieval_rule" not in metrics
    assert (
        "classes of its stored text bank (cat, dog, bird)" in metrics["note"]
        and "by position" in metrics["note"]
    )
    assert "note:" in capsys.readouterr().err
    (tmp_path / "prompt_teacher" / SPLIT).write_text(json.dumps({"classnames": ["cat", "dog"]}))
    with pytest.raises(ConfigError, match="text bank has 3 classes but its names"):
        run_eval(cfg)


def test_bad_tables_are_one_clear_line(tmp_path, data):
    def fails(match, table=data, *extra):
        with pytest.raises(ConfigError, match=match):
            read_labelled(load_config(None, _args(tmp_path, table, *extra)))

    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    fails("lists 0 class names", data, "--data.classnames", str(tmp_path / "empty.txt"))
    (tmp_path / "other.txt").write_text("cat\ndog\nbird\n")
    fails(r"3 labels in column 'label' are not among the 3 class names, e.g. \['blue triangle'", data,
          "--data.classnames", str(tmp_path / "other.txt"))  # fmt: skip
    fails("no column 'klass'", data, "--data.label_key", "klass")
    fails("needs --data.label_key", data, "--data.label_key", "")
    numbered = pd.read_csv(data).assign(label=lambda t: t["label"].map({n: i for i, n in enumerate(NAMES)}))
    numbered.to_csv(tmp_path / "numbered.csv", index=False)
    fails("holds class numbers; name the classes with --data.classnames", tmp_path / "numbered.csv")
    pd.read_csv(data).assign(split="later").to_csv(tmp_path / "split.csv", index=False)
    fails(r"column 'split' holds \['later'\]; use train, val and test", tmp_path / "split.csv")


def test_a_refused_eval_keeps_the_previous_results(tmp_path, data, teacher_dir):
    teacher = ["--eval.model", "teacher", "--teacher.name", f"local-dir:{teacher_dir}"]
    metrics = run_eval(load_config(None, _args(tmp_path, data, *teacher)))
    with pytest.raises(ConfigError, match="no column 'klass'"):
        run_eval(load_config(None, _args(tmp_path, data, *teacher, "--data.label_key", "klass")))
    assert read_json(tmp_path / "teacher" / "eval_pairs.json") == metrics
    with pytest.raises(ConfigError, match="no trained model"):
        run_eval(load_config(None, _args(tmp_path, data, "--eval.model", "typo")))
    assert not (tmp_path / "typo").exists()


def test_paths_from_the_working_folder_are_explained(tmp_path, data, monkeypatch, teacher_dir):
    monkeypatch.chdir(data.parent.parent)
    moved = pd.read_csv(data)
    moved["filepath"] = data.parent.name + "/" + moved["filepath"]
    (tmp_path / "lists").mkdir()
    moved.to_csv(tmp_path / "lists" / "t.csv", index=False)
    with pytest.raises(ConfigError, match="found 0 of 24 there, 24 relative to the working folder"):
        run_eval(
            load_config(
                None,
                _args(
                    tmp_path,
                    tmp_path / "lists" / "t.csv",
                    "--eval.model",
                    "teacher",
                    "--teacher.name",
                    f"local-dir:{teacher_dir}",
                ),
            )
        )
