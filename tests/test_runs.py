"""The run-folder layout: one home for every stage's paths."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clipdistill.cli import main
from clipdistill.config import RunConfig, replace
from clipdistill.runs import (
    FolderBusyError,
    cache_dir,
    data_id,
    exclusive,
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


def test_a_folder_has_one_writer_at_a_time(tmp_path):
    folder = tmp_path / "cid"
    lock = tmp_path / ".cid.lock"
    with exclusive(folder):
        assert lock.read_text().startswith(f"pid {os.getpid()} (`")
        with pytest.raises(FolderBusyError, match=f"{folder} is being written by pid {os.getpid()} "):
            with exclusive(folder):
                pass
        with exclusive(tmp_path / "cache"):  # another stage's folder is free
            pass
    assert not lock.exists() and not folder.exists()  # no trace: the folder is the stage's to make
    with exclusive(folder):  # released
        pass


def test_under_torchrun_rank_0_holds_the_lock_for_every_rank(tmp_path, monkeypatch):
    with exclusive(tmp_path / "cid"):
        monkeypatch.setenv("RANK", "1")
        with exclusive(tmp_path / "cid"):  # a rank of the same job: not refused
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(FolderBusyError):
            with exclusive(tmp_path / "cid"):
                pass


HOLD = (
    "import sys, time; from clipdistill.runs import exclusive\n"
    "with exclusive(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)"
)


def test_the_lock_dies_with_its_holder_kill_9_included(tmp_path):
    folder = tmp_path / "cache"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(FolderBusyError, match=f"pid {holder.pid} "):
            with exclusive(folder):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".cache.lock").exists()  # left by the kill, and no longer locked
    with exclusive(folder):
        assert (tmp_path / ".cache.lock").read_text().startswith(f"pid {os.getpid()} ")
    assert not (tmp_path / ".cache.lock").exists()


@pytest.mark.parametrize(
    ("stage", "folder"),
    [("embed", "cache"), ("balance", "balance"), ("cluster", "cluster"), ("train", "clip")],
)
def test_a_stage_on_a_busy_folder_is_one_line_before_any_work(tmp_path, capsys, stage, folder):
    args = [stage, "--run_dir", str(tmp_path), "--train.method", "clip"]
    with exclusive(tmp_path / folder):
        start = time.time()
        assert main(args) == 1
        assert time.time() - start < 5  # no teacher, no data, no cache was read
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"clipdistill {stage}: FolderBusyError: {tmp_path / folder} is being written by pid"
    )
    assert len(err.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # and it left nothing behind
