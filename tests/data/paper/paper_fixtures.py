"""Tiny datasets in the exact on-disk layouts the paper readers expect: a few 8x8 images per class."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image
from torchvision import transforms as T

TO_TENSOR = T.PILToTensor()  # uint8, no resizing: pixel values identify the image


def write_image(path: Path, value: int) -> None:
    """An 8x8 image whose red channel is `value`, as PNG or JPEG by suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 0, 0)).save(path)


def write_split_dataset(
    folder: Path, images: str, split_file: str, classes: list[str], counts: dict[str, int]
) -> dict[str, list]:
    """CoOp's layout: images in `folder/images/<class>/`, and `folder/split_file` listing
    `[path relative to the image folder, label, class name]` per split. Returns the split file's content."""
    split: dict[str, list] = {}
    value = 0
    for part, count in counts.items():
        split[part] = []
        for label, name in enumerate(classes):
            for i in range(count):
                relative = f"{name}/{part}_{i}.jpg"
                write_image(folder / images / relative, value)
                value += 1
                split[part].append([relative, label, name])
    (folder / split_file).write_text(json.dumps(split))
    return split


def write_classnames(path: Path, names: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{wnid} {name}\n" for wnid, name in names.items()))
