"""The labelled side of the training data, which only ComKD reads: stage 1 learns from labels, and the
inductive variant keeps the images of base classes.

Rows are those of the training source (and so of the teacher cache). On the lab the base classes are
a seeded half (`comkd.base_fraction`, `comkd.split_seed`) and the labelled images a seeded draw of
`data.shots` per base class (`train.seed`; 0 = every image); on a paper dataset the base classes are
CoOp's first half (or every class, `comkd.base_fraction 1`), the labelled images CoOp's few-shot draw of
them (`data.shots` per class, seeded by `train.seed`), as `eval --suite base_to_novel` scores them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from clipdistill.config import ConfigError, RunConfig
from clipdistill.data.lab import load_lab
from clipdistill.data.paper.pairs import paper_split
from clipdistill.data.splits import base_novel_split


@dataclass
class LabelledTrain:
    """What ComKD reads of the training data besides its images, row for row with the pair source."""

    classnames: list[str]  # every class, in the dataset's order: the text bank's rows
    labels: torch.Tensor  # the class of each training row
    base: list[int]  # the base classes
    labelled: np.ndarray | None  # rows stage 1 may learn from; None = every row (novel ones are ignored)


def labelled_train(cfg: RunConfig) -> LabelledTrain:
    """Class names, labels, base classes and stage 1's labelled rows of `cfg.data`'s train split."""
    if cfg.data.kind == "lab":
        lab = load_lab(cfg.data)
        base, _ = base_novel_split(len(lab.classnames), cfg.comkd.base_fraction, cfg.comkd.split_seed)
        labelled = lab_shots(lab.train.labels.numpy(), base, cfg.data.shots, cfg.train.seed)
        return LabelledTrain(list(lab.classnames), lab.train.labels, base, labelled)
    if cfg.data.kind == "paper":
        every_class = paper_every_class(cfg)
        full = paper_split(cfg.data, "train", None)
        protocol = {
            "shots": cfg.data.shots,
            "seed": cfg.train.seed,
            "subsample": "all" if every_class else "base",
        }
        few = paper_split(cfg.data, "train", None, **protocol)
        row_of = {item: row for row, (item, _) in enumerate(full.samples)}
        labels = torch.tensor([label for _, label in full.samples], dtype=torch.long)
        n_base = len(full.classnames) if every_class else math.ceil(len(full.classnames) / 2)  # CoOp's half
        base = list(range(n_base))
        labelled = np.array([row_of[item] for item, _ in few.samples])
        return LabelledTrain(list(full.classnames), labels, base, labelled)
    raise ConfigError(
        "ComKD's stage 1 and inductive variant need class labels: data.kind lab or paper, "
        f"not {cfg.data.kind!r}"
    )


def paper_every_class(cfg: RunConfig) -> bool:
    """On a paper dataset the base classes are CoOp's first half (`comkd.base_fraction` 0.5, the default),
    as its base-to-novel suite scores them, or every class (1.0: your own labelled images, none held out
    as novel); another fraction is refused rather than ignored."""
    if cfg.comkd.base_fraction not in (0.5, 1.0):
        raise ConfigError(
            f"comkd.base_fraction {cfg.comkd.base_fraction}: on a paper dataset the base classes are CoOp's "
            "first half (0.5) or every class (1.0)"
        )
    return cfg.comkd.base_fraction == 1.0


def lab_shots(labels: np.ndarray, base: list[int], shots: int, seed: int) -> np.ndarray | None:
    """Sorted rows of `shots` images per base class (all of a class that has fewer), drawn without
    replacement; None (every row) for shots 0."""
    if shots <= 0:
        return None
    rng = np.random.default_rng(seed)
    rows = [np.flatnonzero(labels == c) for c in base]
    return np.sort(np.concatenate([rng.choice(r, size=min(shots, len(r)), replace=False) for r in rows]))
