"""The labelled rows of ComKD's stage 1 on the lab: a seeded draw of `data.shots` per base class."""

from __future__ import annotations

import numpy as np

from clipdistill.config import load_config
from clipdistill.methods.labelled import lab_shots
from clipdistill.train import training_fingerprint


def test_lab_shots_draws_per_base_class_only_seeded_and_all_for_zero():
    labels = np.repeat(np.arange(4), 10)[np.random.default_rng(0).permutation(40)]
    rows = lab_shots(labels, [0, 2], shots=3, seed=1)
    assert len(rows) == len(set(rows)) == 6 and np.all(np.diff(rows) > 0)
    assert sorted(np.bincount(labels[rows], minlength=4).tolist()) == [0, 0, 3, 3]
    assert set(labels[rows]) == {0, 2}
    assert np.array_equal(rows, lab_shots(labels, [0, 2], shots=3, seed=1))
    assert not np.array_equal(rows, lab_shots(labels, [0, 2], shots=3, seed=2))
    assert len(lab_shots(labels, [0], shots=50, seed=0)) == 10  # a class with fewer: all of it
    assert lab_shots(labels, [0, 2], shots=0, seed=0) is None  # every row


def test_shots_change_the_lab_stage_1_run_only():
    def key(*extra: str) -> str:
        return training_fingerprint(load_config(None, list(extra)))

    stage1 = ("--train.role", "teacher", "--train.method", "prompt_teacher")
    assert key(*stage1, "--data.shots", "16") != key(*stage1, "--data.shots", "4")
    assert key("--data.shots", "16") == key("--data.shots", "4")  # no other lab method reads them
