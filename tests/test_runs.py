"""The run-folder layout: one home for every stage's paths."""

from pathlib import Path

from clipdistill.config import RunConfig, replace
from clipdistill.runs import (
    cache_dir,
    data_id,
    find_run,
    model_dir,
    model_name,
    output_dir,
    run_path,
    seed_run_name,
    sweep_temps,
)


def test_names_and_folders(tmp_path):
    cfg = replace(RunConfig(), {"run_dir": str(tmp_path), "train.method": "cid"})
    assert model_name(cfg) == "cid" and output_dir(cfg) == tmp_path / "cid"
    named = replace(cfg, {"train.name": "short"})
    assert model_name(named) == "short" and model_name(named, "teacher") == "teacher"
    assert output_dir(named) == model_dir(named, "short") == tmp_path / "short"
    assert cache_dir(cfg) == tmp_path / "cache"
    assert cache_dir(replace(cfg, {"data.domain": "blurred"})) == tmp_path / "cache_blurred"
    assert run_path(cfg, "balance/kept.npy") == tmp_path / "balance" / "kept.npy"
    assert run_path(cfg, "/elsewhere/kept.npy") == Path("/elsewhere/kept.npy")


def test_cache_identity_follows_the_data():
    cfg = RunConfig()
    assert data_id(cfg) == "lab:default:val5000:train0"
    assert data_id(replace(cfg, {"data.val_size": 256})) != data_id(cfg)
    paper = replace(cfg, {"data.kind": "paper", "data.dataset": "eurosat", "data.path": "/d"})
    assert data_id(paper) == "paper:eurosat:/d"


def test_seeded_runs_are_found_by_the_seed(tmp_path):
    cfg = replace(RunConfig(), {"run_dir": str(tmp_path), "train.seed": 2})
    assert seed_run_name("cid", 2, [0]) == "cid" and seed_run_name("cid", 2, [0, 1, 2]) == "cid_seed2"
    assert find_run(cfg, "cid", "done.json") is None
    (tmp_path / "cid_seed2").mkdir()
    (tmp_path / "cid_seed2" / "done.json").write_text("{}")
    assert find_run(cfg, "cid", "done.json") == tmp_path / "cid_seed2"
    (tmp_path / "cid").mkdir()
    (tmp_path / "cid" / "done.json").write_text("{}")
    assert find_run(cfg, "cid", "done.json") == tmp_path / "cid"  # the configured folder first


def test_sweep_removes_half_written_files_only(tmp_path):
    for name in (".model.safetensors.x1.tmp", ".eval.csv.x2.tmp", "model.safetensors", "notes.tmp"):
        (tmp_path / name).write_text("x")
    sweep_temps(tmp_path, ".eval.*.tmp")
    assert not (tmp_path / ".eval.csv.x2.tmp").exists() and (tmp_path / ".model.safetensors.x1.tmp").exists()
    sweep_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "notes.tmp"]
