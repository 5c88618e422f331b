"""`lab.jobs`: the grid's trainings run several at a time in their own processes, with the same results
as one at a time at the same threads per training."""

from __future__ import annotations

import shutil

import pytest
import torch

import clipdistill.lab.demo as demo
from clipdistill.config import ConfigError, load_config
from clipdistill.runs import model_dir
from conftest import needs_lab, tiny_overrides

# what differs between two runs of one model: times, and the eval fingerprint (it hashes done.json, which
# holds the training time)
TIMINGS = ("eval_seconds", "train_seconds", "eval_fingerprint")


def without_timings(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key not in TIMINGS}


def test_comkd_stage_2_waits_for_every_other_job():
    jobs = [("prompt_teacher", 0), ("comkd", 0), ("no_kd", 0), ("promptkd", 1), ("student_zeroshot", 0)]
    assert demo.job_waves(jobs) == [  # the untrained student reads the prompt teacher's text bank too
        [("prompt_teacher", 0), ("no_kd", 0)],
        [("comkd", 0), ("promptkd", 1), ("student_zeroshot", 0)],
    ]


@needs_lab
def test_two_jobs_at_a_time_give_the_results_of_one_at_a_time(tmp_path, capsys):
    def config(run_dir, jobs):
        rows = [
            "--lab.rows", '["no_kd"]', "--lab.seeds", "[0, 1]",
            "--lab.jobs", str(jobs), "--lab.teacher_steps", "4",
        ]  # fmt: skip
        return load_config(None, tiny_overrides(run_dir, *rows, "--eval.linear_probe", "false"))

    one_by_one, at_once = config(tmp_path / "one", 1), config(tmp_path / "two", 2)
    demo.train_teacher(one_by_one)
    shutil.copytree(model_dir(one_by_one, "teacher"), model_dir(at_once, "teacher"))
    jobs = [("no_kd", 0), ("no_kd", 1)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # what each of the two processes gets below
        expected = demo.run_jobs(one_by_one, jobs)
        torch.set_num_threads(2)
        got = demo.run_jobs(at_once, jobs)
    finally:
        torch.set_num_threads(threads)
    assert {job: without_timings(m) for job, m in got.items()} == {
        job: without_timings(m) for job, m in expected.items()
    }
    assert expected[jobs[0]]["zeroshot_top1"] != expected[jobs[1]]["zeroshot_top1"]  # two seeds, two models
    assert all((model_dir(at_once, f"no_kd_seed{s}") / "done.json").is_file() for s in (0, 1))
    # each job's progress bars in its own log, one line per finished job on the terminal
    assert all("train" in demo.job_log(at_once, *job).read_text() for job in jobs)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert [line[:6] for line in lines] == ["[1/2] ", "[2/2] "]
    assert {line[6:].split(":")[0] for line in lines} == {"no_kd seed 0", "no_kd seed 1"}


def test_a_failed_job_stops_the_grid_with_its_error(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, "--lab.jobs", "2"))
    with pytest.raises(FileNotFoundError, match="no teacher cache"):  # raised in the job's process
        demo.run_jobs(cfg, [("cid", 0)])


def test_jobs_below_one_are_refused_as_the_config_loads(tmp_path):
    with pytest.raises(ConfigError, match="lab.jobs must be at least 1, not 0"):
        load_config(None, tiny_overrides(tmp_path, "--lab.jobs", "0"))
