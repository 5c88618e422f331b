"""benchmarks/screen_baselines.py: which points the baselines' screen trains, and in what order."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repo root

from benchmarks.screen_baselines import GRID, is_origin, points  # noqa: E402


def test_every_grid_holds_its_origin_and_runs_it_first():
    screen = points(["no_kd", *GRID])
    assert screen[0] == ("no_kd", "no_kd", {})
    first = {row: next(overrides for _, r, overrides in screen if r == row) for row in GRID}
    assert all(is_origin(row, overrides) for row, overrides in first.items())
    # at the teacher's own logit scale, as CLIP-KD's code, set so that the lab row's 100 cannot replace it
    assert first["crd"] == {"distill.weight": 1.0, "distill.teacher_logit_scale": 0.0}


def test_crd_is_screened_at_the_teachers_own_scale_and_at_100():
    names = [name for name, row, _ in points(["crd"]) if row == "crd"]
    assert names[:4] == ["crd_w1", "crd_w0.3", "crd_w3", "crd_w10"]
    assert names[4:] == ["crd_w0.3_t100", "crd_w1_t100", "crd_w3_t100"]
    assert not is_origin("crd", {"distill.weight": 1.0, "distill.teacher_logit_scale": 100.0})
