"""The labelled rows of ComKD's stage 1: on the lab a seeded draw of `data.shots` per base class, on an
image folder CoOp's draw of its first half of the classes, or of every class."""

from __future__ import annotations

import numpy as np
import pytest

from clipdistill.config import ConfigError, load_config
from clipdistill.methods.labelled import lab_shots, labelled_train
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


def test_your_own_image_folder_can_label_every_class(tmp_path):
    """CoOp's half of the classes is the papers' protocol; on your own labelled images stage 1 may learn
    from all of them (`comkd.base_fraction 1`). Another fraction would be ignored: refused."""
    from PIL import Image

    for cls in ("ant", "bee", "cat", "dog"):
        for i in range(3):
            (tmp_path / "train" / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / "train" / cls / f"{i}.png")

    def labelled(*extra: str):
        args = ["--data.kind", "paper", "--data.dataset", "image_folder", "--data.path", str(tmp_path)]
        return labelled_train(load_config(None, [*args, "--data.shots", "2", *extra]))

    half = labelled()
    assert half.base == [0, 1] and set(half.labels[half.labelled].tolist()) == {0, 1}
    every = labelled("--comkd.base_fraction", "1")
    assert every.base == [0, 1, 2, 3] and np.bincount(every.labels[every.labelled]).tolist() == [2, 2, 2, 2]
    with pytest.raises(ConfigError, match="CoOp's first half \\(0.5\\) or every class \\(1.0\\)"):
        labelled("--comkd.base_fraction", "0.3")
