"""The embedded lab: Fashion-MNIST from Debian's `dataset-fashion-mnist`, captioned from class names.

Images stay in memory as uint8 (55 MB for all 70k) and batches are sliced from tensors, so the
lab's data pipeline costs almost nothing next to the model.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipdistill.config import DataConfig
from clipdistill.data.shifts import DOMAIN_SHIFTS

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSNAMES = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
]
TEMPLATES = [
    "a photo of a {c}.",
    "a picture of a {c}.",
    "a black and white photo of a {c}.",
    "a grayscale image of a {c}.",
    "a low resolution photo of a {c}.",
    "a small photo of a {c}.",
    "a blurry photo of a {c}.",
    "a product photo of a {c}.",
    "a catalogue image of a {c}.",
    "an item of clothing: a {c}.",
    "a {c}.",
    "a {c} on a dark background.",
    "a pixelated {c}.",
    "a centered photo of a {c}.",
    "a tiny thumbnail of a {c}.",
    "this is a {c}.",
    "a close-up photo of a {c}.",
    "a fashion photo of a {c}.",
    "a shop listing showing a {c}.",
    "a scanned image of a {c}.",
    "a cropped photo of a {c}.",
    "a simple picture of the {c}.",
    "one {c}, photographed from above.",
    "a monochrome snapshot of a {c}.",
]
MEAN, STD = 0.286, 0.353


class LabDataError(FileNotFoundError):
    """The Fashion-MNIST files are missing or malformed."""


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise LabDataError(
            f"{path}: cannot read ({e}); reinstall with `apt-get install dataset-fashion-mnist`"
        ) from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise LabDataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise LabDataError(f"{path}: truncated (the header alone needs {4 + 4 * ndim} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise LabDataError(f"{path}: truncated ({body.size} of {int(np.prod(shape))} bytes)")
    return body.reshape(shape)


@dataclass
class LabSplit:
    images: torch.Tensor  # uint8 [N, 28, 28]
    labels: torch.Tensor  # int64 [N]
    captions: list[str]  # one fixed caption per image

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class LabData:
    train: LabSplit
    val: LabSplit
    test: LabSplit
    classnames: list[str]
    templates: list[str]


def caption_for(label: int, sample: int) -> str:
    """A fixed caption per sample: its class name in one of the templates, chosen by sample number."""
    template = TEMPLATES[(sample * 7919 + label) % len(TEMPLATES)]
    return template.format(c=CLASSNAMES[label])


def _split(images: np.ndarray, labels: np.ndarray, rows: np.ndarray, first_sample: int) -> LabSplit:
    captions = [caption_for(int(labels[r]), first_sample + int(r)) for r in rows]
    return LabSplit(
        torch.from_numpy(images[rows].copy()), torch.from_numpy(labels[rows].astype(np.int64)), captions
    )


def load_lab(cfg: DataConfig) -> LabData:
    """Train / held-out validation / test splits; the validation rows are a fixed seeded draw."""
    folder = Path(cfg.path or DEBIAN_DIR)
    arrays = {}
    for split, (image_file, label_file) in FILES.items():
        image_path, label_path = folder / image_file, folder / label_file
        for path in (image_path, label_path):
            if not path.is_file():
                raise LabDataError(
                    f"{path} is missing: install Debian's Fashion-MNIST with "
                    "`apt-get install dataset-fashion-mnist` (or `make deps`), or set --data.path"
                )
        arrays[split] = (read_idx(image_path), read_idx(label_path))
    if cfg.domain:  # a target set for cross-dataset distillation: the same classes, shifted images
        arrays = {split: (shift_domain(x, cfg.domain), y) for split, (x, y) in arrays.items()}
    train_images, train_labels = arrays["train"]
    order = np.random.default_rng(0).permutation(len(train_labels))
    val_rows = np.sort(order[: cfg.val_size])
    train_rows = np.sort(order[cfg.val_size :])
    if cfg.train_size:
        train_rows = train_rows[: cfg.train_size]
    test_images, test_labels = arrays["test"]
    return LabData(
        train=_split(train_images, train_labels, train_rows, 0),
        val=_split(train_images, train_labels, val_rows, 0),
        test=_split(test_images, test_labels, np.arange(len(test_labels)), len(train_labels)),
        classnames=list(CLASSNAMES),
        templates=list(TEMPLATES),
    )


def shift_domain(images: np.ndarray, domain: str) -> np.ndarray:
    """uint8 [N, 28, 28] images moved to one of the evaluation's shifted domains, still uint8."""
    x = torch.from_numpy(np.array(images)).float().div_(255).unsqueeze(1)
    shifted = DOMAIN_SHIFTS[domain](x).squeeze(1).mul_(255).round_().clamp_(0, 255)
    return shifted.to(torch.uint8).numpy()


def to_pixels(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [B, 28, 28] -> float [B, 3, S, S] in [0, 1]: padded to 32 px, resized if S differs."""
    x = images.float().div_(255).unsqueeze(1)
    x = F.pad(x, (2, 2, 2, 2))
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1)
