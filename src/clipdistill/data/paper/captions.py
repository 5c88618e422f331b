"""COCO and Flickr30k retrieval from Karpathy's split files (`dataset_coco.json`, `dataset_flickr30k.json`).

Each file lists `images[]` with `split` (train, restval, val, test), `filename`, for COCO the `filepath`
folder (train2014 / val2014), and `sentences[].raw`, the captions. As is usual, "train" includes COCO's
"restval" images (Karpathy's 113k training images).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from clipdistill.data.classification import ImageFolderSet
from clipdistill.data.pairs import Transform

KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
EXPECTED = (
    '{"images": [{"split": ..., "filename": ..., "filepath": ... (COCO only), "sentences": [{"raw": ...}]}]}'
)


def load_karpathy(
    json_path: str | os.PathLike, image_root: str | os.PathLike, split: str
) -> list[tuple[str, list[str]]]:
    """`(image path, its captions)` for each image of `split`, in file order."""
    json_path, image_root = Path(json_path), Path(image_root)
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"{json_path}: no split {split!r}; Karpathy splits are {', '.join(KARPATHY_SPLITS)}")
    if not json_path.is_file():
        raise FileNotFoundError(
            f"expected Karpathy's split file at {json_path} (dataset_coco.json or dataset_flickr30k.json)"
        )
    if not image_root.is_dir():
        raise FileNotFoundError(f"{json_path}: expected the image folder at {image_root}")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path}: not valid JSON ({e}); expected {EXPECTED}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{json_path}: expected {EXPECTED}")
    items = []
    for i, entry in enumerate(data["images"]):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("split"), str)
            and isinstance(entry.get("filename"), str)
            and isinstance(entry.get("filepath", ""), str)
            and isinstance(entry.get("sentences"), list)
            and all(isinstance(s, dict) and isinstance(s.get("raw"), str) for s in entry["sentences"])
        ):
            raise ValueError(f"{json_path}: images[{i}] does not match {EXPECTED}")
        if entry["split"] not in KARPATHY_SPLITS[split]:
            continue
        captions = [s["raw"].strip() for s in entry["sentences"] if s["raw"].strip()]
        if not captions:
            raise ValueError(f"{json_path}: images[{i}] ({entry['filename']}) has no captions")
        items.append((str(image_root / entry.get("filepath", "") / entry["filename"]), captions))
    if not items:
        raise ValueError(f"{json_path}: no images in split {split!r}")
    return items


class CaptionRetrievalSet(ImageFolderSet):
    """The images of a Karpathy split as `(image, image index)`, with every caption in `captions`.

    Reads images as `ImageFolderSet` does, so `collate_labeled` batches it and a bad image is a counted
    skip; `batch["label"]` then holds the indices of the images that were encoded, and `targets` gives
    the captions and `text_to_image` for `retrieval_recall` over just those images.
    """

    def __init__(
        self, json_path: str | os.PathLike, image_root: str | os.PathLike, split: str, transform: Transform
    ):
        items = load_karpathy(json_path, image_root, split)
        self.samples = [(path, i) for i, (path, _) in enumerate(items)]
        self.image_captions = [captions for _, captions in items]
        self.captions = [c for captions in self.image_captions for c in captions]
        self.text_to_image = torch.tensor(
            [i for i, captions in enumerate(self.image_captions) for _ in captions], dtype=torch.long
        )
        self.transform = transform

    def targets(self, encoded: Sequence[int]) -> tuple[list[str], torch.Tensor]:
        """Captions and their image's row in the features of `encoded` (image indices, in feature order)."""
        captions, text_to_image = [], []
        for row, image in enumerate(encoded):
            captions += self.image_captions[image]
            text_to_image += [row] * len(self.image_captions[image])
        return captions, torch.tensor(text_to_image, dtype=torch.long)
