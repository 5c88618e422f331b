"""Readers for the benchmark datasets of the two papers, from folders already on disk.

`build_dataset(name, root, split, transform)` gives a labelled set like `ImageFolderSet`: it yields
`(image, label)` (or a bad-sample record) and has `classnames`, `templates` and `samples`, so zero-shot,
linear-probe and base-to-novel evaluation run on it unchanged. Nothing is downloaded: `root` is the folder
that holds each dataset's own folder, laid out as CoOp (and for CIFAR / STL-10, torchvision) keep them;
for `image_folder` it is the dataset's folder itself. COCO and Flickr30k retrieval sets are in `captions`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from torch.utils.data import Dataset

from clipdistill.data.pairs import Transform
from clipdistill.data.paper.captions import CaptionRetrievalSet, load_karpathy
from clipdistill.data.paper.cifar_stl import build_cifar, build_stl10
from clipdistill.data.paper.coop import build_fgvc_aircraft, build_imagenet, build_split_file_dataset
from clipdistill.data.paper.folders import build_image_folder
from clipdistill.data.paper.imagenet_variants import build_variant

Builder = Callable[[str, str | os.PathLike, str, Transform, int, int, str], Dataset]

DATASETS: dict[str, Builder] = {
    "imagenet": build_imagenet,
    "caltech101": build_split_file_dataset,
    "oxford_pets": build_split_file_dataset,
    "stanford_cars": build_split_file_dataset,
    "oxford_flowers": build_split_file_dataset,
    "food101": build_split_file_dataset,
    "fgvc_aircraft": build_fgvc_aircraft,
    "sun397": build_split_file_dataset,
    "dtd": build_split_file_dataset,
    "eurosat": build_split_file_dataset,
    "ucf101": build_split_file_dataset,
    "imagenet_v2": build_variant,
    "imagenet_sketch": build_variant,
    "imagenet_a": build_variant,
    "imagenet_r": build_variant,
    "cifar10": build_cifar,
    "cifar100": build_cifar,
    "stl10": build_stl10,
    "image_folder": build_image_folder,  # root/{train,val,test}/<class>/*, for any other folder dataset
}

DATASET_TITLES = {
    "imagenet": "ImageNet",
    "caltech101": "Caltech101",
    "oxford_pets": "OxfordPets",
    "stanford_cars": "StanfordCars",
    "oxford_flowers": "Flowers102",
    "food101": "Food101",
    "fgvc_aircraft": "FGVCAircraft",
    "sun397": "SUN397",
    "dtd": "DTD",
    "eurosat": "EuroSAT",
    "ucf101": "UCF101",
    "imagenet_v2": "ImageNet-V2",
    "imagenet_sketch": "ImageNet-Sketch",
    "imagenet_a": "ImageNet-A",
    "imagenet_r": "ImageNet-R",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "stl10": "STL-10",
    "image_folder": "ImageFolder",
}

_BASE_TO_NOVEL = [
    "imagenet",
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
]
SUITES: dict[str, list[str]] = {
    "base_to_novel": _BASE_TO_NOVEL,
    "cross_dataset": _BASE_TO_NOVEL[1:],
    "domain_generalization": ["imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"],
    "linear_probe": ["cifar10", "cifar100", "stl10"],
}


def build_dataset(
    name: str,
    root: str | os.PathLike,
    split: str,
    transform: Transform,
    *,
    shots: int = 0,
    seed: int = 1,
    subsample: str = "all",
) -> Dataset:
    """The `split` of dataset `name` under `root`: `shots > 0` keeps a seeded few-shot sample of train (and
    min(shots, 4) per class of val), `subsample` "base" / "new" keeps the first / second half of the classes,
    relabelled from 0, as CoOp does."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name](name, root, split, transform, shots, seed, subsample)


__all__ = [
    "DATASETS",
    "DATASET_TITLES",
    "SUITES",
    "CaptionRetrievalSet",
    "build_dataset",
    "load_karpathy",
]
