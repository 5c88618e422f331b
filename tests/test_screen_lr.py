"""benchmarks/screen_lr.py: how a row's learning rate is chosen from the screen."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repo root

from benchmarks.screen_baselines import summary  # noqa: E402
from benchmarks.screen_lr import choose  # noqa: E402


def _point(*val: float) -> dict:
    runs = [{"seed": seed, "val_zeroshot_top1": v} for seed, v in enumerate(val)]
    return {"runs": runs, "summary": summary(runs)}


def _report(points: dict) -> dict:
    return {"seeds": [0, 1, 2], "shared_lr": "0.002", "points": points}


def test_a_lead_beyond_one_std_picks_the_other_rate():
    points = {"no_kd": {"0.002": _point(85.0, 85.1, 84.9), "0.003": _point(86.0, 86.1, 85.9)}}
    assert choose(_report(points)) == {"no_kd": "0.003"}


def test_a_lead_within_one_std_keeps_the_shared_rate():
    points = {"cid": {"0.002": _point(86.46, 86.34, 86.64), "0.003": _point(86.60, 86.66, 86.22)}}
    assert choose(_report(points)) == {"cid": "0.002"}


def test_rates_missing_seeds_are_not_chosen():
    points = {"fd": {"0.002": _point(85.0, 85.1, 84.9), "0.001": _point(90.0)}}
    assert choose(_report(points)) == {"fd": "0.002"}
    assert choose(_report({"fd": {"0.001": _point(90.0)}})) == {}
