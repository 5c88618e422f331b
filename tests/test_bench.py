"""`clipdistill bench` around a stand-in for the lab pipeline: rows, aliases, schema, table, plots.

The pipeline itself (`demo.run_demo`) is the demo's and is tested there; a real tiny bench takes
minutes on CPU (zero-shot eval of the whole test split), so it is replaced here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import clipdistill.lab.bench as bench
from clipdistill.checkpoint import read_json, write_json
from clipdistill.cli import main
from clipdistill.config import to_dict
from clipdistill.lab import METRICS, summarize


@pytest.fixture
def fake_pipeline(monkeypatch):
    """run_demo that writes what the real one writes (results.json, each run's metrics.jsonl)."""
    trained: list[list[str]] = []

    def run_demo(cfg):
        trained.append(list(cfg.lab.rows))
        results = {"teacher": {m: summarize([50.0]) for m in METRICS}}
        results["teacher_zeroshot"] = {"zeroshot_top1": summarize([49.0])}
        for i, row in enumerate(cfg.lab.rows):
            per_seed = []
            for seed in cfg.lab.seeds:
                folder = Path(cfg.run_dir) / (row if len(cfg.lab.seeds) == 1 else f"{row}_seed{seed}")
                folder.mkdir(parents=True)
                lines = [json.dumps({"step": s, "loss": 4.0 - s / 10}) for s in (1, 2, 3)]
                (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
                per_seed.append({m: 10.0 * i + seed for m in METRICS})
            results[row] = {m: summarize([s[m] for s in per_seed]) for m in METRICS}
        write_json(Path(cfg.run_dir) / cfg.lab.results, {"results": results, "config": to_dict(cfg)})
        return {}

    monkeypatch.setattr(bench, "run_demo", run_demo)
    return trained


def test_bench_writes_schema_table_and_plots(fake_pipeline, tmp_path, capsys):
    run_dir = tmp_path / "bench"
    rows = "[no_kd, fd, cid, cid_all_data, comkd_not_registered]"
    assert main(["bench", "--run_dir", str(run_dir), "--lab.rows", rows]) == 0
    assert "skipping 'comkd_not_registered'" in capsys.readouterr().out
    assert fake_pipeline == [["no_kd", "fd", "cid"]]  # cid_all_data reuses cid: trained once
    report = read_json(run_dir / "results.json")
    results = report["results"]
    assert set(results) == {"teacher", "no_kd", "fd", "cid", "cid_all_data"}
    assert results["cid_all_data"] == results["cid"]
    assert report["config"]["lab"]["seeds"] == [0, 1, 2]  # the bench default
    for row in results.values():
        for metric in row.values():
            assert set(metric) == {"mean", "std", "values"}
    assert len(results["fd"]["zeroshot_top1"]["values"]) == 3
    assert results["fd"]["zeroshot_top1"]["std"] == pytest.approx(1.0)
    table = (run_dir / "results.md").read_text()
    assert "| cid_all_data |" in table and "±" in table
    for name in ("accuracy.png", "curves.png", "accuracy_vs_time.png"):
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG"


def test_only_picks_a_group_writes_its_own_report_and_command_line_wins(fake_pipeline, tmp_path):
    run_dir = tmp_path / "bench"
    assert main(["bench", "--run_dir", str(run_dir), "--only", "baselines", "--lab.seeds", "[0]"]) == 0
    assert fake_pipeline == [["no_kd", "fd", "crd", "icl", "tinyclip_affinity", "cid"]]
    assert not (run_dir / "results.json").exists()  # the full grid's report is never overwritten
    assert read_json(run_dir / "results_baselines.json")["config"]["lab"]["seeds"] == [0]
    assert "| tinyclip_affinity |" in (run_dir / "results_baselines.md").read_text()
    assert (run_dir / "accuracy_baselines.png").is_file()


def test_teacher_zeroshot_is_reported_from_the_teacher_eval_not_trained(fake_pipeline, tmp_path):
    run_dir = tmp_path / "bench"
    assert main(["bench", "--run_dir", str(run_dir), "--lab.rows", "[no_kd, teacher_zeroshot]"]) == 0
    assert fake_pipeline == [["no_kd"]]
    results = read_json(run_dir / "results.json")["results"]
    assert set(results) == {"teacher", "no_kd", "teacher_zeroshot"}
    assert results["teacher_zeroshot"]["zeroshot_top1"]["mean"] == 49.0


def test_bench_defaults_to_its_own_run_dir():
    args = bench.bench_overrides(["--train.steps", "2"])
    assert args[args.index("--run_dir") + 1] == "runs/bench" and args[-2:] == ["--train.steps", "2"]
    assert "runs/bench" not in bench.bench_overrides(["--run_dir", "elsewhere"])


def test_every_group_row_is_registered_and_chained_rows_follow_their_start():
    from clipdistill.lab import ROWS

    for group, rows in bench.GROUPS.items():
        assert all(row in ROWS or row in bench.ALIASES or row == "teacher_zeroshot" for row in rows), group
        trained = [row for row in rows if row in ROWS]
        for i, row in enumerate(trained):
            start = ROWS[row].get("comkd.student_init")
            if start:  # stage 2 starts from that student: it must be trained earlier in the group
                assert start in trained[:i], (group, row)
            if ROWS[row].get("train.method") in ("comkd", "promptkd"):
                assert "prompt_teacher" in trained[:i], (group, row)


def test_each_baseline_has_a_views_row_that_differs_by_the_views_flag_only():
    from clipdistill.lab import ROWS
    from clipdistill.lab.demo import BASELINES

    for name, setting in BASELINES.items():
        views = ROWS[f"{name}_views2"]
        assert views == setting | {"embed.views": 2} and ROWS[name] == setting, name
        assert {name, f"{name}_views2"} <= set(bench.GROUPS["reinforced"]), name


def test_gradient_shares_are_averaged_over_the_log_steps_that_have_them(tmp_path):
    from clipdistill.lab.demo import logged_diagnostics

    lines = [
        {"step": 20, "loss": 3.0, "grad_share/clip": 0.2, "grad_share/kd": 0.8},
        {"step": 40, "loss": 2.0, "grad_share/clip": 0.6, "grad_share/kd": 0.4},
        {"step": 41, "loss": 2.0},  # a log line without shares (a run resumed with the option off)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert logged_diagnostics(tmp_path) == pytest.approx({"grad_share/clip": 0.4, "grad_share/kd": 0.6})
    assert logged_diagnostics(tmp_path / "absent") == {}


def test_comkds_attention_diagnostics_are_read_and_tabulated(tmp_path):
    from clipdistill.lab.demo import format_table, logged_diagnostics

    lines = [
        {"step": 20, "alpha": 0.1, "attention_entropy": 0.002},
        {"step": 40, "alpha": 0.3, "attention_entropy": 0.004},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert logged_diagnostics(tmp_path) == pytest.approx({"alpha": 0.2, "attention_entropy": 0.003})
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 20, "alpha": 0.0}) + "\n")  # no EduAttention
    assert logged_diagnostics(tmp_path) == {}
    results = {
        "comkd": {"hm": summarize([70.0]), "alpha": summarize([0.2]), "attention_entropy": summarize([0.003])}
    }
    assert format_table(results).splitlines()[2] == "| comkd | 70.00 | H/logK 0.003 α 0.20 |"


def test_table_shows_each_distillation_rows_gradient_shares():
    from clipdistill.lab import format_table

    results = {
        "no_kd": {"zeroshot_top1": summarize([84.0, 85.0])},
        "fd": {
            "zeroshot_top1": summarize([85.0, 86.0]),
            "grad_share/clip": summarize([0.3, 0.5]),
            "grad_share/kd": summarize([0.7, 0.5]),
        },
    }
    lines = format_table(results).splitlines()
    assert lines[0] == "| row | zeroshot_top1 | shares |"
    assert lines[2] == "| no_kd | 84.50 ± 0.71 |  |"
    assert lines[3] == "| fd | 85.50 ± 0.71 | clip 0.40 kd 0.60 |"
    assert "shares" not in format_table({"no_kd": results["no_kd"]})


def test_distillation_rows_train_with_gradient_shares_on_their_first_seed_and_no_kd_without():
    from clipdistill.config import load_config, replace
    from clipdistill.lab import LAB_CONFIG, row_config

    cfg = replace(load_config(str(LAB_CONFIG)), {"lab.seeds": [0, 1, 2]})
    assert row_config(cfg, "fd", 0).train.grad_share and row_config(cfg, "cid", 0).train.grad_share
    assert not row_config(cfg, "cid", 1).train.grad_share and not row_config(cfg, "cid", 2).train.grad_share
    assert not row_config(cfg, "no_kd", 0).train.grad_share
    assert not row_config(replace(cfg, {"lab.grad_share": False}), "cid", 0).train.grad_share  # make demo


def test_a_rows_shares_come_from_the_seeds_that_logged_them():
    from clipdistill.lab.demo import diagnostic_keys

    first = {"zeroshot_top1": 80.0, "grad_share/cd": 0.7, "grad_share/clip": 0.3}
    assert diagnostic_keys([first, {"zeroshot_top1": 81.0}, {"zeroshot_top1": 82.0}]) == [
        "grad_share/cd",
        "grad_share/clip",
    ]
    assert diagnostic_keys([{"zeroshot_top1": 81.0, "alpha": 0.1, "attention_entropy": 0.01}]) == [
        "alpha",
        "attention_entropy",
    ]
    assert diagnostic_keys([{"zeroshot_top1": 81.0}]) == []


def test_comkd_rows_share_one_target_domain():
    """Stage 1 learns the target that stage 2 distils on and every ComKD row is scored on."""
    from clipdistill.lab import ROWS
    from clipdistill.lab.demo import COMKD_TARGET

    comkd_rows = [
        row for row, o in ROWS.items() if o.get("train.method") in ("prompt_teacher", "comkd", "promptkd")
    ]
    assert {"prompt_teacher", "promptkd", "comkd", "comkd_no_ifalign", "comkd_no_eduattention"} <= set(
        comkd_rows
    )
    for row in comkd_rows:
        assert ROWS[row]["data.domain"] == COMKD_TARGET["data.domain"] != "", row
        assert ROWS[row]["eval.protocol"] in ("all", "base_to_novel"), row
    assert all(not o.get("data.domain") for row, o in ROWS.items() if row not in comkd_rows)


def test_first_seed_rows_train_on_seed_0_only_and_the_table_says_so(monkeypatch, tmp_path, fake_pipeline):
    from clipdistill.config import load_config, replace
    from clipdistill.lab import LAB_CONFIG, demo

    trained = []
    monkeypatch.setattr(demo, "train", lambda cfg: trained.append(cfg.train.name))
    monkeypatch.setattr(demo, "evaluated", lambda cfg, name: {"zeroshot_top1": 80.0})
    overrides = {"run_dir": str(tmp_path), "lab.rows": ["no_kd", "cid"], "lab.seeds": [0, 1, 2]}
    cfg = replace(load_config(str(LAB_CONFIG)), overrides | {"lab.first_seed_rows": ["cid"]})
    results = demo.run_rows(cfg)
    assert trained == ["no_kd_seed0", "no_kd_seed1", "no_kd_seed2", "cid_seed0"]
    assert len(results["no_kd"]["zeroshot_top1"]["values"]) == 3
    assert results["cid"]["zeroshot_top1"]["values"] == [80.0]

    run_dir = tmp_path / "bench"  # the bench's own default: the ablations on seed 0, and its header says so
    assert main(["bench", "--run_dir", str(run_dir), "--lab.rows", "[no_kd, cid, cid_all_data]"]) == 0
    header = (run_dir / "results.md").read_text().splitlines()[0]
    assert header == "# clipdistill bench (mean ± std over seeds 0, 1, 2; cid, cid_all_data: seed 0 only)"
