"""Labelled image sets for zero-shot and linear-probe evaluation, with their class names and prompts.

A set gives `(image_tensor, label)`; an image that cannot be decoded gives `{"bad": reason, "id": path,
"index": i}` instead, and `collate_labeled` (the DataLoader collate_fn) moves it to `batch["skipped"]`
so the evaluation counts it rather than failing or silently scoring fewer images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from clipdistill.data.images import BadSample, decode_image, to_rgb
from clipdistill.data.pairs import Transform

DEFAULT_TEMPLATES = ["a photo of a {c}."]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def collate_labeled(samples: list) -> dict:
    """Stack the good `(image, label)` samples; list the bad ones as `batch["skipped"] = [(reason, id)]`."""
    good = [s for s in samples if isinstance(s, tuple)]
    return {
        "image": torch.stack([image for image, _ in good]) if good else torch.empty(0),
        "label": torch.tensor([label for _, label in good], dtype=torch.long),
        "skipped": [(s["bad"], s["id"]) for s in samples if isinstance(s, dict)],
    }


class ImageFolderSet(Dataset):
    """One sub-folder of images per class, classes in sorted folder order; `a_b` names class "a b"."""

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Transform,
        classnames: list[str] | None = None,
        templates: list[str] | None = None,
    ):
        root = Path(root)
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ValueError(f"{root}: no class folders; expected one sub-folder of images per class")
        if classnames is not None and len(classnames) != len(folders):
            raise ValueError(f"{root}: {len(classnames)} classnames given for {len(folders)} class folders")
        self.classnames = (
            list(classnames) if classnames is not None else [f.replace("_", " ") for f in folders]
        )
        self.templates = check_templates(templates or DEFAULT_TEMPLATES, "templates")
        self.samples = [
            (str(path), label)
            for label, folder in enumerate(folders)
            for path in sorted((root / folder).rglob("*"))
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise ValueError(f"{root}: no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | dict:
        path, label = self.samples[i]
        try:
            image = decode_image(path)
        except BadSample as e:
            return {"bad": e.reason, "id": path, "index": i}
        return self.transform(image), label


class ArraySet(Dataset):
    """Images in a uint8 array, N x H x W (grey) or N x H x W x C (C = 1, 3 or 4), with integer labels.

    Arrays given as `.npy` paths are memory-mapped, so a large set is not loaded up front.
    """

    def __init__(
        self,
        images: np.ndarray | str | os.PathLike,
        labels: np.ndarray | str | os.PathLike,
        classnames: list[str],
        transform: Transform,
        templates: list[str] | None = None,
    ):
        self.images = images if isinstance(images, np.ndarray) else np.load(images, mmap_mode="r")
        self.labels = np.asarray(labels if isinstance(labels, np.ndarray) else np.load(labels))
        _check_arrays(self.images, self.labels, len(classnames))
        self.classnames = list(classnames)
        self.templates = check_templates(templates or DEFAULT_TEMPLATES, "templates")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        pixels = np.asarray(self.images[i])
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[:, :, 0]
        return self.transform(to_rgb(Image.fromarray(pixels))), int(self.labels[i])


def _check_arrays(images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
    shape = images.shape
    if images.dtype != np.uint8 or not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3, 4))):
        raise ValueError(
            f"images: expected uint8 N x H x W or N x H x W x C (C = 1, 3, 4), got {images.dtype} {shape}"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != shape[0]:
        raise ValueError(f"labels: expected {shape[0]} integers, got {labels.dtype} {labels.shape}")
    if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise ValueError(
            f"labels: {labels.min()}..{labels.max()} fall outside 0..{num_classes - 1} (the classnames)"
        )


def load_classnames_templates(
    path: str | os.PathLike, dataset: str | None = None, templates_path: str | os.PathLike | None = None
) -> tuple[list[str], list[str]]:
    """Class names and prompt templates (with a `{c}` placeholder) from JSON.

    Either one file `{"classnames": [...], "templates": [...]}`, or CLIP_benchmark's two files, each
    mapping dataset -> list: `path` holds the class names, `templates_path` the templates, and
    `dataset` picks the entry.
    """
    if dataset is None:
        data = _load_json(path)
        if not isinstance(data, dict) or not {"classnames", "templates"} <= data.keys():
            raise ValueError(
                f'{path}: expected {{"classnames": [...], "templates": [...]}}; for CLIP_benchmark\'s '
                "dataset -> list files pass dataset= and templates_path="
            )
        classnames, templates, templates_source = data["classnames"], data["templates"], path
    else:
        if templates_path is None:
            raise ValueError(f"{path}: dataset={dataset!r} also needs templates_path= (the templates JSON)")
        classnames = _dataset_entry(path, dataset)
        templates, templates_source = _dataset_entry(templates_path, dataset), templates_path
    if (
        not isinstance(classnames, list)
        or not classnames
        or not all(isinstance(c, str) and c for c in classnames)
    ):
        raise ValueError(f"{path}: classnames must be a non-empty list of non-empty strings")
    return classnames, check_templates(templates, templates_source)


def check_templates(templates: object, source: str | os.PathLike) -> list[str]:
    """Templates must be a non-empty list of strings, each with a `{c}` for the class name."""
    if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
        raise ValueError(
            f"{source}: templates must be a non-empty list of strings like 'a photo of a {{c}}.'"
        )
    for template in templates:
        if "{c}" not in template:
            raise ValueError(f"{source}: template {template!r} has no {{c}} placeholder for the class name")
    return list(templates)


def _load_json(path: str | os.PathLike) -> object:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _dataset_entry(path: str | os.PathLike, dataset: str) -> object:
    data = _load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object mapping dataset name -> list")
    if dataset not in data:
        raise ValueError(f"{path}: no entry for dataset {dataset!r}; it has {sorted(data)[:20]}")
    return data[dataset]


def path_hint(root: Path, paths: list[str], checked: int = 2000) -> str:
    """Where a table's relative image paths were looked for (`root`, the table's folder) and whether
    they exist relative to the working folder instead: the usual reason all of a table's images are
    missing. "" when the paths are absolute."""
    relative = [p for p in paths[:checked] if p and not os.path.isabs(p)]
    if not relative:
        return ""
    there = sum((Path(root) / p).is_file() for p in relative)
    here = sum(Path(p).is_file() for p in relative)
    hint = f"Paths are read relative to the table's folder {root}; found {there} of {len(relative)} there"
    if here > there:
        hint += (
            f", {here} relative to the working folder {Path.cwd()}: write them relative to the "
            "table's folder (or absolute)"
        )
    return hint + ". "
