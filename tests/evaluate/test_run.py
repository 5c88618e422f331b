import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clipdistill.config import ConfigError, load_config, replace
from clipdistill.data.lab import load_lab
from clipdistill.evaluate.run import eval_stem, evaluate_model, run_eval
from clipdistill.models.classifier import load_trained
from clipdistill.models.factory import count_parameters
from clipdistill.runs import output_dir
from clipdistill.train import train
from conftest import needs_lab, tiny_overrides

pytestmark = needs_lab

PERCENT_KEYS = ("zeroshot_top1", "linear_probe_top1", "retrieval_i2t_r1", "retrieval_t2i_r1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = load_config(None, tiny_overrides(tmp_path_factory.mktemp("eval")))
    train(cfg)
    return cfg


def test_load_trained_is_the_trained_model(trained):
    loaded = load_trained(trained, "clip")
    weights = load_file(output_dir(trained) / "model.safetensors")
    state = loaded.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())


def test_run_eval_metrics_and_files(trained):
    metrics = run_eval(trained)

    assert metrics["params"] == count_parameters(load_trained(trained, "clip").model)
    for key in PERCENT_KEYS:
        assert 0.0 <= metrics[key] <= 100.0, key
    assert metrics["linear_probe_top1"] > 20.0  # well above chance (10%) even for a barely trained model
    assert metrics["retrieval_rule"] == "class"

    folder = output_dir(trained)
    assert json.loads((folder / "eval.json").read_text()) == metrics
    with open(folder / "eval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["model"] == "clip"
    assert float(rows[0]["zeroshot_top1"]) == pytest.approx(metrics["zeroshot_top1"])
    assert set(PERCENT_KEYS) | {"params"} <= set(rows[0])


def test_missing_model_and_other_data_are_config_errors(trained):
    with pytest.raises(ConfigError, match="run `clipdistill train --train.name nope` first"):
        evaluate_model(trained, "nope")
    trained_csv = load_config(None, ["--run_dir", trained.run_dir, "--data.kind", "csv"])
    with pytest.raises(ConfigError, match="eval runs on the lab data"):
        evaluate_model(trained_csv, "clip")


def test_teacher_eval_features_are_computed_once_per_tower(trained, monkeypatch):
    import clipdistill.evaluate.run as run_module

    torch.manual_seed(0)  # the tiny teacher has no checkpoint: a seeded random tower
    first = evaluate_model(trained, "teacher")
    assert list((Path(trained.run_dir) / "eval_features").rglob("test_0_none_*.npy"))

    def no_encoding(*args, **kwargs):
        raise AssertionError("the teacher's image features were computed again")

    monkeypatch.setattr(run_module, "image_features", no_encoding)
    torch.manual_seed(0)
    second = evaluate_model(trained, "teacher")
    first.pop("eval_seconds"), second.pop("eval_seconds")
    assert second == first
    torch.manual_seed(1)  # another tower: its features are not the memo's
    with pytest.raises(AssertionError, match="computed again"):
        evaluate_model(trained, "teacher")


def test_val_split_and_target_domain_score_their_own_images(trained, monkeypatch):
    """`eval.split val` scores the validation images (no probe, no retrieval: they need test); on a
    target domain the domain shifts are the other shifts of the clean images."""
    import clipdistill.evaluate.run as run_module

    scored = []
    encode = run_module.image_features

    def spy(loaded, split, batch_size, device, limit=0, desc="", shift=None):
        scored.append((len(split), split.images[:4].clone(), shift))
        return encode(loaded, split, batch_size, device, limit, desc, shift)

    monkeypatch.setattr(run_module, "image_features", spy)
    cfg = replace(trained, {"eval.split": "val", "eval.protocol": "all", "data.domain": "low_contrast"})
    metrics = evaluate_model(cfg, "clip")
    assert "linear_probe_top1" not in metrics and "retrieval_i2t_r1" not in metrics
    assert {"hm", "domain_inverted", "domain_shift_avg"} <= set(metrics)
    assert "domain_low_contrast" not in metrics
    val_size = trained.data.val_size
    assert all(n == val_size for n, _, _ in scored)  # every feature is of a validation image
    target, clean = load_lab(cfg.data).val, load_lab(trained.data).val
    unshifted = [images for _, images, shift in scored if shift is None]
    shifted = [images for _, images, shift in scored if shift is not None]
    assert len(unshifted) == 1 and torch.equal(unshifted[0], target.images[:4])
    assert shifted and all(torch.equal(images, clean.images[:4]) for images in shifted)


def test_linear_probe_can_be_left_out(trained):
    metrics = evaluate_model(replace(trained, {"eval.linear_probe": False}), "clip")
    assert "linear_probe_top1" not in metrics and {"zeroshot_top1", "retrieval_i2t_r1"} <= set(metrics)


def test_each_evaluation_has_its_own_files_named_after_what_it_scored(trained):
    assert eval_stem(trained) == "eval"
    assert eval_stem(replace(trained, {"eval.split": "val"})) == "eval_val"
    assert eval_stem(replace(trained, {"data.domain": "low_contrast"})) == "eval_low_contrast"
    mine = replace(trained, {"data.kind": "csv", "data.path": "photos/labelled.csv"})
    assert eval_stem(mine) == "eval_labelled"
