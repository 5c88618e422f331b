"""The lab's report: results, the resolved config, each stage's seconds and the host that measured them
(digits reproduce per kind of CPU)."""

from __future__ import annotations

import clipdistill.lab.demo as demo
from clipdistill.checkpoint import read_json
from clipdistill.config import load_config
from clipdistill.host import host_info
from clipdistill.lab import LAB_CONFIG


def test_the_report_names_its_host_and_stage_times(monkeypatch, tmp_path):
    for stage in ("train_teacher", "run_embed", "run_balance", "run_cluster"):
        monkeypatch.setattr(demo, stage, lambda cfg: None)
    monkeypatch.setattr(demo, "run_rows", lambda cfg: {"teacher": {"zeroshot_top1": demo.summarize([80.0])}})
    cfg = load_config(str(LAB_CONFIG), ["--run_dir", str(tmp_path), "--lab.rows", "[cid]"])
    demo.run_demo(cfg)
    report = read_json(tmp_path / "results.json")
    assert report["host"] == host_info()
    assert set(report["stage_seconds"]) == {"teacher", "embed", "balance_and_cluster", "students_and_eval"}
    assert report["config"]["run_dir"] == str(tmp_path)
