"""Any other dataset kept as image folders: `root/{train,val,test}/<class>/*`, as torchvision's
ImageFolder and CLIP_benchmark read them, for the linear-probe and zero-shot sets the papers add.

The train folder fixes the classes (sorted folder names, `a_b` read as "a b"); the other splits may hold
any of them. The prompt is CLIP's plain "a photo of a {c}."
"""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset

from clipdistill.data.classification import DEFAULT_TEMPLATES
from clipdistill.data.pairs import Transform
from clipdistill.data.paper.common import SampleSet, need_dir, prompt_name, select
from clipdistill.data.paper.coop import list_class_folders


def build_image_folder(
    name: str,
    root: str | os.PathLike,
    split: str,
    transform: Transform,
    shots: int,
    seed: int,
    subsample: str,
) -> Dataset:
    layout = "image folders: root/{train,val,test}/<class>/*, the classes named by the train folders"
    train_dir = need_dir(Path(root) / "train", name, layout)
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith("."))
    labels = {c: i for i, c in enumerate(classes)}
    samples, classnames = select(
        name,
        lambda part: list_class_folders(need_dir(Path(root) / part, name, layout), labels, name, train_dir),
        classes,
        split,
        shots=shots,
        seed=seed,
        subsample=subsample,
    )
    return SampleSet(samples, [prompt_name(c) for c in classnames], list(DEFAULT_TEMPLATES), transform)
