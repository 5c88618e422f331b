"""benchmarks/screen_comkd.py: the diagnostics it keeps per screened run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repo root

from benchmarks.screen_comkd import diagnostics, summary  # noqa: E402


def test_diagnostics_average_the_log_steps_that_report_them(tmp_path):
    records = [
        {
            "step": 20,
            "loss": 1.0,
            "alpha": 0.1,
            "attention_entropy": 0.5,
            "grad_share/kd": 0.6,
            "grad_share/align": 0.4,
        },
        {"step": 40, "loss": 0.9, "alpha": 0.3, "attention_entropy": 0.3},  # shares not measured here
        {
            "step": 60,
            "loss": 0.8,
            "alpha": 0.2,
            "attention_entropy": 0.1,
            "grad_share/kd": 0.8,
            "grad_share/align": 0.2,
        },
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = diagnostics(path)
    assert out["alpha"] == pytest.approx(0.2) and out["attention_entropy"] == pytest.approx(0.3)
    assert out["grad_share/kd"] == pytest.approx(0.7) and out["grad_share/align"] == pytest.approx(0.3)
    assert "grad_share/align" not in diagnostics(_write(tmp_path, [{"step": 1, "grad_share/kd": 1.0}]))


def test_summary_is_mean_and_std_over_seeds():
    assert summary([{"hm": 60.0}, {"hm": 62.0}], "hm") == "61.00 ± 1.41"
    assert summary([{"hm": 60.0}], "domain_shift_avg") == "-"


def _write(folder: Path, records: list[dict]) -> Path:
    path = folder / "other.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path
