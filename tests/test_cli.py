"""The command line's error reporting: one line by default, the traceback with --debug."""

import pytest

from clipdistill import cli
from clipdistill.cli import main
from clipdistill.config import ConfigError


def test_an_error_is_one_line_without_debug(capsys):
    assert main(["train", "--train.method", "magic"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipdistill train: config error: train.method: 'magic' is not one of")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_debug_shows_the_traceback():
    with pytest.raises(ConfigError, match="train.method: 'magic'"):
        main(["train", "--debug", "--train.method", "magic"])


def test_a_stage_error_is_one_line_and_debug_raises_it(tmp_path, capsys):
    missing = tmp_path / "run"
    args = ["eval", "--run_dir", str(missing), "--eval.model", "nothing_trained"]
    assert main(args) == 2  # no trained model: a config error naming the file
    assert "model.safetensors" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        main([*args, "--debug"])


def test_a_refused_stage_leaves_no_run_dir_it_made_but_keeps_one_that_was_there(tmp_path, capsys):
    new = tmp_path / "typo" / "run"
    assert main(["cluster", "--run_dir", str(new)]) == 1  # no teacher cache: refused
    assert "run `clipdistill embed` first" in capsys.readouterr().err
    assert not new.exists() and not new.parent.exists()  # nor the parent it made for it
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main(["cluster", "--run_dir", str(kept)]) == 1
    assert kept.is_dir()


def test_usage_names_every_stage_including_the_path_commands(capsys):
    with pytest.raises(SystemExit):
        main([])
    usage = capsys.readouterr().err
    for stage in (
        "embed",
        "balance",
        "cluster",
        "train",
        "eval",
        "export",
        "demo",
        "bench",
        "predict",
        "embed-images",
    ):
        assert stage in usage


def test_every_bench_group_is_a_choice_of_only():
    from clipdistill.cli import BENCH_GROUPS
    from clipdistill.lab.bench import GROUPS

    assert set(BENCH_GROUPS) == set(GROUPS)


@pytest.mark.parametrize(("rank", "printed"), [(None, True), ("0", True), ("1", False)])
def test_under_torchrun_only_rank_0_prints_the_result(monkeypatch, capsys, rank, printed):
    monkeypatch.setattr(cli, "_run_in_run_dir", lambda stage, cfg, only: {"stage": stage})
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    assert main(["balance"]) == 0
    assert (capsys.readouterr().out != "") == printed
