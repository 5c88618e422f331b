"""CIFAR-10, CIFAR-100 and STL-10 of the CLIP-CID linear-probe / zero-shot protocol, in their usual layouts.

CIFAR comes as the python pickles (`root/cifar-10-batches-py`, `root/cifar-100-python`), unpickled by an
unpickler that builds nothing but numpy arrays, because a pickle can run any code it names. STL-10 comes
as the binaries (`root/stl10_binary`), memory-mapped. None of them has a validation split, so, as in
CLIP's linear-probe protocol, a fixed 10% of each class of the official train set is held out: "train"
is the rest, "val" the held-out part, "trainval" the whole official train set.
"""

from __future__ import annotations

import importlib
import os
import pickle
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from clipdistill.data.pairs import Transform
from clipdistill.data.paper.common import ArrayRowsSet, need_dir, need_file, prompt_name, select

LINEAR_PROBE_SPLITS = ("train", "val", "test", "trainval")
VAL_FRACTION = 0.1
VAL_SEED = 0  # fixed, so the held-out images do not move with the few-shot seed
CIFAR_TEMPLATES = [
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a black and white photo of a {c}.",
    "a low contrast photo of a {c}.",
    "a high contrast photo of a {c}.",
    "a bad photo of a {c}.",
    "a good photo of a {c}.",
    "a photo of a small {c}.",
    "a photo of a big {c}.",
    "a photo of the {c}.",
    "a blurry photo of the {c}.",
    "a black and white photo of the {c}.",
    "a low contrast photo of the {c}.",
    "a high contrast photo of the {c}.",
    "a bad photo of the {c}.",
    "a good photo of the {c}.",
    "a photo of the small {c}.",
    "a photo of the big {c}.",
]
STL10_TEMPLATES = ["a photo of a {c}.", "a photo of the {c}."]

# numpy's array reconstructors, under their numpy 1 and numpy 2 module names: all a CIFAR pickle needs
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


def _latin1_encode(text: str, encoding: str) -> bytes:
    """How Python 3 writes bytes in a protocol 2 pickle; any other codec is refused."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with codec {encoding!r}")
    return text.encode("latin1")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers, strings and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str):
        if (module, name) in _NUMPY_GLOBALS:
            return getattr(importlib.import_module(module.replace("numpy.core", "numpy._core")), name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR pickle holds only arrays")


def load_pickle(path: Path, dataset: str) -> dict:
    """A CIFAR pickle as a dict with str keys (the files were written by Python 2, so bytes are decoded)."""
    try:
        with open(path, "rb") as file:
            data = _ArrayUnpickler(file, encoding="bytes").load()
    except Exception as e:  # a corrupt or hostile pickle raises almost anything
        raise ValueError(f"{dataset}: {path} is not a CIFAR python pickle ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{dataset}: {path}: expected a pickled dict, got {type(data).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in data.items()}


def _names(values: object, path: Path, key: str, dataset: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, bytes | str) for v in values):
        raise ValueError(f"{dataset}: {path}: expected {key!r}, a list of class names")
    return [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]


def _cifar_batch(path: Path, label_key: str, num_classes: int, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch as N x 32 x 32 x 3 images and N labels."""
    data = load_pickle(path, dataset)
    pixels, labels = data.get("data"), data.get(label_key)
    if (
        not isinstance(pixels, np.ndarray)
        or pixels.dtype != np.uint8
        or pixels.ndim != 2
        or pixels.shape[1] != 3072
    ):
        raise ValueError(f"{dataset}: {path}: expected 'data', a uint8 N x 3072 array")
    labels = np.asarray(labels) if isinstance(labels, list) else labels
    if (
        not isinstance(labels, np.ndarray)
        or labels.shape != (len(pixels),)
        or not np.issubdtype(labels.dtype, np.integer)
        or (len(labels) and not 0 <= labels.min() <= labels.max() < num_classes)
    ):
        raise ValueError(
            f"{dataset}: {path}: expected {label_key!r}, {len(pixels)} labels in 0..{num_classes - 1}"
        )
    return pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.int64)


def held_out(labels: np.ndarray) -> np.ndarray:
    """Rows of the fixed validation part: a seeded VAL_FRACTION of each class, at least one image of any
    class that has two."""
    rng = np.random.default_rng(VAL_SEED)
    rows = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        count = max(1, round(VAL_FRACTION * len(members))) if len(members) > 1 else 0
        rows.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(rows)) if rows else np.zeros(0, np.int64)


def _array_dataset(
    name: str,
    images: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    classnames: list[str],
    templates: list[str],
    split: str,
    transform: Transform,
    shots: int,
    seed: int,
    subsample: str,
) -> Dataset:
    """Turn the official train/test arrays into the four splits and apply the protocol.

    `images` and `labels` need only the official part `split` comes from ("test", or else "train").
    """

    def read(part: str) -> list:
        if part == "test":
            return [(r, int(label)) for r, label in enumerate(labels["test"])]
        train = labels["train"]
        rows = np.arange(len(train)) if part == "trainval" else held_out(train)
        if part == "train":
            rows = np.setdiff1d(np.arange(len(train)), rows)
        return [(int(r), int(train[r])) for r in rows]

    samples, classnames = select(
        name, read, classnames, split, splits=LINEAR_PROBE_SPLITS, shots=shots, seed=seed, subsample=subsample
    )
    return ArrayRowsSet(
        images["test" if split == "test" else "train"],
        samples,
        [prompt_name(c) for c in classnames],
        templates,
        transform,
    )


def build_cifar(
    name: str,
    root: str | os.PathLike,
    split: str,
    transform: Transform,
    shots: int,
    seed: int,
    subsample: str,
) -> Dataset:
    if name == "cifar10":
        folder_name, meta_name, names_key, label_key = (
            "cifar-10-batches-py",
            "batches.meta",
            "label_names",
            "labels",
        )
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    else:
        folder_name, meta_name, names_key, label_key = (
            "cifar-100-python",
            "meta",
            "fine_label_names",
            "fine_labels",
        )
        files = {"train": ["train"], "test": ["test"]}
    listed = ", ".join([meta_name, *files["train"], *files["test"]])
    layout = f"CIFAR's python version: root/{folder_name}/ with {listed}"
    folder = need_dir(Path(root) / folder_name, name, layout)
    meta = need_file(folder / meta_name, name, layout)
    classnames = _names(load_pickle(meta, name).get(names_key), meta, names_key, name)
    part = "test" if split == "test" else "train"
    batches = [
        _cifar_batch(need_file(folder / f, name, layout), label_key, len(classnames), name)
        for f in files[part]
    ]
    images = {part: np.ascontiguousarray(np.concatenate([b[0] for b in batches]))}
    labels = {part: np.concatenate([b[1] for b in batches])}
    return _array_dataset(
        name, images, labels, classnames, CIFAR_TEMPLATES, split, transform, shots, seed, subsample
    )


def _stl_split(folder: Path, part: str, num_classes: int, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """STL-10's `<part>_X.bin` (uint8 N x 3 x 96 x 96, column-major) and `<part>_y.bin` (labels 1..10)."""
    x_path = need_file(folder / f"{part}_X.bin", "stl10", layout)
    y_path = need_file(folder / f"{part}_y.bin", "stl10", layout)
    side = 96 * 96 * 3
    if x_path.stat().st_size == 0 or x_path.stat().st_size % side:
        raise ValueError(f"stl10: {x_path} is {x_path.stat().st_size} bytes; expected a multiple of 96*96*3")
    images = np.memmap(x_path, np.uint8, mode="r").reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)
    labels = np.fromfile(y_path, np.uint8).astype(np.int64) - 1
    if labels.shape != (len(images),) or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"stl10: {y_path}: expected {len(images)} labels in 1..{num_classes}, one byte each")
    return images, labels


def build_stl10(
    name: str,
    root: str | os.PathLike,
    split: str,
    transform: Transform,
    shots: int,
    seed: int,
    subsample: str,
) -> Dataset:
    layout = "STL-10's binary version: root/stl10_binary/ with class_names.txt and {train,test}_{X,y}.bin"
    folder = need_dir(Path(root) / "stl10_binary", name, layout)
    names_file = need_file(folder / "class_names.txt", name, layout)
    classnames = [
        line.strip() for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    images, labels = {}, {}
    for part in ("train", "test"):
        images[part], labels[part] = _stl_split(folder, part, len(classnames), layout)
    return _array_dataset(
        name, images, labels, classnames, STL10_TEMPLATES, split, transform, shots, seed, subsample
    )
