"""Every lab row is a config that loads: a bench of an hour must not stop at its fortieth row."""

from __future__ import annotations

import pytest

from clipdistill.config import load_config
from clipdistill.lab import LAB_CONFIG
from clipdistill.lab.bench import ALIASES, ALL_ROWS, GROUPS
from clipdistill.lab.demo import ROWS, row_config


@pytest.mark.parametrize("row", sorted(ROWS))
def test_every_row_builds_its_config(row):
    cfg = row_config(load_config(str(LAB_CONFIG), ["--lab.seeds", "[0, 1]"]), row, 1)
    assert cfg.train.name == f"{row}_seed1" and cfg.train.steps >= 1


def test_the_bench_runs_only_known_rows_and_the_untrained_student_is_saved_as_it_starts():
    trained = {ALIASES.get(row, row) for group in [ALL_ROWS, *GROUPS.values()] for row in group}
    assert trained - {"teacher_zeroshot"} <= set(ROWS)  # the teacher is scored, not trained
    cfg = row_config(load_config(str(LAB_CONFIG)), "student_zeroshot", 0)
    assert (cfg.train.steps, cfg.train.lr, cfg.train.warmup_steps) == (1, 0.0, 0)
