"""What every paper dataset shares: sets built from sample lists, CoOp's few-shot sampler and base/new
halving, and errors that name the file or folder that was expected.

A reader turns a dataset's files into lists of `(item, label)` per split, where the item is an image path
or a row of an image array; `select` then applies the protocol (few-shot, base/new) the same way for all.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from clipdistill.data.classification import ImageFolderSet, check_templates
from clipdistill.data.images import to_rgb
from clipdistill.data.pairs import Transform

SPLITS = ("train", "val", "test")
SUBSAMPLES = ("all", "base", "new")
VAL_SHOTS = 4  # CoOp samples min(shots, 4) validation images per class

Sample = tuple[str, int] | tuple[int, int]


class SampleSet(ImageFolderSet):
    """Images listed as `(path, label)`, the form CoOp's split files take.

    It reads images exactly as `ImageFolderSet` does (a bad image becomes a counted skip), so it does not
    scan folders: the list is the split.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        classnames: list[str],
        templates: list[str],
        transform: Transform,
    ):
        self.samples = samples
        self.classnames = classnames
        self.templates = check_templates(templates, "templates")
        self.transform = transform


class ArrayRowsSet(Dataset):
    """Rows of an N x H x W x 3 uint8 array (possibly memory-mapped) listed as `(row, label)`.

    Labels come from `samples`, not from the array, so a few-shot or base/new selection keeps its labels.
    """

    def __init__(
        self,
        images: np.ndarray,
        samples: list[tuple[int, int]],
        classnames: list[str],
        templates: list[str],
        transform: Transform,
    ):
        self.images = images
        self.samples = samples
        self.classnames = classnames
        self.templates = check_templates(templates, "templates")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row, label = self.samples[i]
        return self.transform(to_rgb(Image.fromarray(np.ascontiguousarray(self.images[row])))), label


def need_dir(path: Path, dataset: str, layout: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{dataset}: expected the folder {path} ({layout})")
    return path


def need_file(path: Path, dataset: str, layout: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{dataset}: expected the file {path} ({layout})")
    return path


def fewshot(samples: Sequence[Sample], shots: int, rng: random.Random) -> list[Sample]:
    """CoOp's `generate_fewshot_dataset`: `shots` per class drawn without replacement, classes in order of
    first appearance; a class with fewer images keeps them all.

    Given the same list and `random.Random(seed)`, it draws what CoOp draws after `random.seed(seed)`.
    """
    by_label: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_label[sample[1]].append(sample)
    picked: list[Sample] = []
    for items in by_label.values():
        picked += rng.sample(items, shots) if len(items) >= shots else items
    return picked


def subsample_classes(
    samples: list[Sample], classnames: list[str], subsample: str
) -> tuple[list[Sample], list[str]]:
    """CoOp's base/new halving: the first ceil(n/2) labels are base, the rest new, relabelled from 0."""
    if subsample == "all":
        return samples, classnames
    half = math.ceil(len(classnames) / 2)
    selected = range(half) if subsample == "base" else range(half, len(classnames))
    kept = [(item, label - selected.start) for item, label in samples if label in selected]
    return kept, classnames[selected.start : selected.stop]


def select(
    dataset: str,
    read: Callable[[str], list[Sample]],
    classnames: list[str],
    split: str,
    *,
    splits: Sequence[str] = SPLITS,
    shots: int = 0,
    seed: int = 1,
    subsample: str = "all",
    sample_val: bool = True,
) -> tuple[list[Sample], list[str]]:
    """The samples and class names of `split` under the few-shot and base/new settings.

    `read(split)` lists one split. With `shots > 0`, train keeps `shots` per class and (when `sample_val`)
    val keeps min(shots, 4) per class, drawn after train from the same generator, as CoOp does; test is
    never sampled.
    """
    if split not in splits:
        raise ValueError(f"{dataset}: no split {split!r}; it has {', '.join(splits)}")
    if subsample not in SUBSAMPLES:
        raise ValueError(f"{dataset}: subsample must be one of {', '.join(SUBSAMPLES)}, got {subsample!r}")
    if shots < 0:
        raise ValueError(f"{dataset}: shots must be >= 0, got {shots}")
    samples = read(split)
    if shots > 0 and split == "train":
        samples = fewshot(samples, shots, random.Random(seed))
    elif shots > 0 and split == "val" and sample_val:
        rng = random.Random(seed)
        fewshot(read("train"), shots, rng)  # advances the generator as CoOp's train draw does
        samples = fewshot(samples, min(shots, VAL_SHOTS), rng)
    samples, classnames = subsample_classes(samples, classnames, subsample)
    if not samples:
        raise ValueError(f"{dataset}: split {split!r} (subsample={subsample!r}) has no images")
    return samples, classnames


def prompt_name(classname: str) -> str:
    """CoOp's prompt form of a class name: underscores read as spaces."""
    return classname.replace("_", " ").strip()
