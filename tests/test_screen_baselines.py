"""benchmarks/screen_baselines.py: which points the baselines' screen trains, and in what order."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` lives at the repo root

from benchmarks.screen_baselines import GRID, choose, is_origin, point_name, points  # noqa: E402


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


def test_an_exact_tie_goes_to_the_origin_then_to_the_earlier_point_whatever_the_reports_order():
    def entry(row, overrides, mean):
        runs, summary = [{"seed": s} for s in range(3)], {"val_zeroshot_top1": {"mean": mean}}
        return {"row": row, "overrides": overrides, "runs": runs, "summary": summary}

    fd, crd = GRID["fd"], GRID["crd"]
    tied = [entry("fd", fd[0], 85.32), entry("fd", fd[1], 85.32), entry("fd", fd[2], 85.0)]
    tied += [entry("crd", crd[-2], 85.85), entry("crd", crd[3], 85.85), entry("crd", crd[1], 85.6)]
    for order in (tied, tied[::-1]):
        report = {"seeds": [0, 1, 2], "points": {point_name(e["row"], e["overrides"]): e for e in order}}
        assert choose(report) == {"fd": "fd_w2000", "crd": "crd_w10"}  # the origin; the earlier in the grid
    report["points"]["fd_w200"]["summary"]["val_zeroshot_top1"]["mean"] = 85.33
    assert choose(report)["fd"] == "fd_w200"  # a better mean wins
