"""The 11 prompt-learning datasets of the CoOp / PromptKD / ComKD protocol, read from CoOp's layout.

`root` is CoOp's DATASET.ROOT: each dataset sits in its own folder under it (`root/oxford_pets/...`).
Nine datasets take their train/val/test split from CoOp's `split_zhou_*.json` (train, val and test lists
of `[path relative to the image folder, label, class name]`); ImageNet is read from its class folders
(`images/train`, and `images/val` as both val and test) with `classnames.txt`; FGVCAircraft from its own
`images_variant_*.txt` lists. Templates are CoOp's hand-crafted prompt per dataset.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from clipdistill.data.classification import IMAGE_EXTENSIONS
from clipdistill.data.pairs import Transform
from clipdistill.data.paper.common import SampleSet, need_dir, need_file, prompt_name, select


@dataclass(frozen=True)
class SplitFileSpec:
    folder: str  # under root
    images: str  # the image folder the split file's paths are relative to, under `folder`
    split_file: str
    template: str


SPLIT_FILE_DATASETS = {
    "caltech101": SplitFileSpec(
        "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", "a photo of a {c}."
    ),
    "oxford_pets": SplitFileSpec(
        "oxford_pets", "images", "split_zhou_OxfordPets.json", "a photo of a {c}, a type of pet."
    ),
    "stanford_cars": SplitFileSpec("stanford_cars", "", "split_zhou_StanfordCars.json", "a photo of a {c}."),
    "oxford_flowers": SplitFileSpec(
        "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", "a photo of a {c}, a type of flower."
    ),
    "food101": SplitFileSpec(
        "food-101", "images", "split_zhou_Food101.json", "a photo of {c}, a type of food."
    ),
    "sun397": SplitFileSpec("sun397", "SUN397", "split_zhou_SUN397.json", "a photo of a {c}."),
    "dtd": SplitFileSpec("dtd", "images", "split_zhou_DescribableTextures.json", "{c} texture."),
    "eurosat": SplitFileSpec(
        "eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of {c}."
    ),
    "ucf101": SplitFileSpec(
        "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json", "a photo of a person doing {c}."
    ),
}
IMAGENET_TEMPLATE = "a photo of a {c}."
FGVC_TEMPLATE = "a photo of a {c}, a type of aircraft."

# CoOp names EuroSAT's classes for prompting; a split file written with the folder names gets them too
EUROSAT_NAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}


def read_split_file(path: Path, image_dir: Path, dataset: str) -> tuple[dict[str, list], list[str]]:
    """CoOp's split file as `{split: [(image path, label)]}` and the class names by label.

    Every label must keep one class name, and labels must run 0..n-1, or the file is not a CoOp split.
    """
    expected = '{"train": [...], "val": [...], "test": [...]}, each a list of [image path, label, class name]'
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{dataset}: {path} is not valid JSON ({e}); expected {expected}") from None
    if not isinstance(data, dict) or not {"train", "val", "test"} <= data.keys():
        raise ValueError(f"{dataset}: {path}: expected {expected}")
    splits: dict[str, list] = {}
    names: dict[int, str] = {}
    for split in ("train", "val", "test"):
        entries = data[split]
        if not isinstance(entries, list):
            raise ValueError(f"{dataset}: {path}: {split!r} is not a list; expected {expected}")
        splits[split] = []
        for i, entry in enumerate(entries):
            if not (
                isinstance(entry, list)
                and len(entry) == 3
                and isinstance(entry[0], str)
                and isinstance(entry[1], int)
                and not isinstance(entry[1], bool)
                and entry[1] >= 0
                and isinstance(entry[2], str)
            ):
                raise ValueError(
                    f"{dataset}: {path}: {split}[{i}] is {entry!r}; expected [image path, label, class name]"
                )
            relative, label, name = entry
            if names.setdefault(label, name) != name:
                raise ValueError(
                    f"{dataset}: {path}: label {label} is named both {names[label]!r} and {name!r}"
                )
            splits[split].append((str(image_dir / relative), label))
    if sorted(names) != list(range(len(names))):
        missing = sorted(set(range(max(names, default=-1) + 1)) - names.keys())
        raise ValueError(
            f"{dataset}: {path}: labels must run 0..n-1 with a name each; missing {missing[:10]}"
        )
    return splits, [names[label] for label in range(len(names))]


def build_split_file_dataset(
    name: str,
    root: str | os.PathLike,
    split: str,
    transform: Transform,
    shots: int,
    seed: int,
    subsample: str,
) -> Dataset:
    spec = SPLIT_FILE_DATASETS[name]
    layout = (
        f"CoOp layout: root/{spec.folder}/{spec.split_file}, "
        f"its paths relative to root/{spec.folder}/{spec.images}"
    )
    folder = need_dir(Path(root) / spec.folder, name, layout)
    image_dir = need_dir(folder / spec.images, name, layout)
    splits, classnames = read_split_file(need_file(folder / spec.split_file, name, layout), image_dir, name)
    if name == "eurosat":
        classnames = [EUROSAT_NAMES.get(c, c) for c in classnames]
    samples, classnames = select(
        name, splits.__getitem__, classnames, split, shots=shots, seed=seed, subsample=subsample
    )
    return SampleSet(samples, [prompt_name(c) for c in classnames], [spec.template], transform)


def read_wnid_names(path: Path, dataset: str) -> dict[str, str]:
    """CoOp's `classnames.txt`: one `<wnid> <class name>` per line, in label order."""
    names: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, classname = line.strip().partition(" ")
        if not classname.strip():
            raise ValueError(
                f"{dataset}: {path} line {number} is {line!r}; expected '<wnid> <class name>', "
                "e.g. 'n01440764 tench'"
            )
        names[wnid] = classname.strip()
    if not names:
        raise ValueError(f"{dataset}: {path} is empty; expected one '<wnid> <class name>' per line")
    return names


def list_class_folders(folder: Path, labels: dict[str, int], dataset: str, names_file: Path) -> list:
    """`(path, label)` for the images of each class sub-folder and the folders inside it (as `eval` reads a
    folder tree), sorted; every folder must be a known class."""
    subs = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not subs:
        raise ValueError(
            f"{dataset}: no class folders in {folder}; expected one sub-folder of images per class"
        )
    samples = []
    for sub in subs:
        if sub not in labels:
            raise ValueError(f"{dataset}: {folder / sub} is not a class listed in {names_file}")
        images = sorted(
            p.relative_to(folder / sub)
            for p in (folder / sub).rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        samples += [(str(folder / sub / image), labels[sub]) for image in images]
    return samples


def build_imagenet(
    name: str,
    root: str | os.PathLike,
    split: str,
    transform: Transform,
    shots: int,
    seed: int,
    subsample: str,
) -> Dataset:
    """ImageNet as CoOp reads it: labels in sorted wnid order; the official val set is val and test."""
    layout = "CoOp layout: root/imagenet/classnames.txt and root/imagenet/images/{train,val}/<wnid>/*"
    folder = need_dir(Path(root) / "imagenet", name, layout)
    names_file = need_file(folder / "classnames.txt", name, layout)
    names = read_wnid_names(names_file, name)
    wnids = sorted(names)
    labels = {wnid: label for label, wnid in enumerate(wnids)}

    def read(part: str) -> list:
        image_dir = need_dir(folder / "images" / ("train" if part == "train" else "val"), name, layout)
        return list_class_folders(image_dir, labels, name, names_file)

    samples, classnames = select(
        name,
        read,
        [names[w] for w in wnids],
        split,
        shots=shots,
        seed=seed,
        subsample=subsample,
        sample_val=False,
    )
    return SampleSet(samples, [prompt_name(c) for c in classnames], [IMAGENET_TEMPLATE], transform)


def build_fgvc_aircraft(
    name: str,
    root: str | os.PathLike,
    split: str,
    transform: Transform,
    shots: int,
    seed: int,
    subsample: str,
) -> Dataset:
    """FGVCAircraft's own lists: `variants.txt` (class names) and `images_variant_<split>.txt`."""
    layout = (
        "CoOp layout: root/fgvc_aircraft/ with variants.txt, images_variant_{train,val,test}.txt and images/"
    )
    folder = need_dir(Path(root) / "fgvc_aircraft", name, layout)
    image_dir = need_dir(folder / "images", name, layout)
    variants = need_file(folder / "variants.txt", name, layout)
    classnames = [line.strip() for line in variants.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = {c: i for i, c in enumerate(classnames)}

    def read(part: str) -> list:
        path = need_file(folder / f"images_variant_{part}.txt", name, layout)
        samples = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            image, _, variant = line.strip().partition(" ")
            if variant not in labels:
                raise ValueError(
                    f"{name}: {path} line {number} is {line!r}; expected '<image id> <variant>' with a "
                    f"variant listed in {variants}"
                )
            samples.append((str(image_dir / f"{image}.jpg"), labels[variant]))
        return samples

    samples, classnames = select(name, read, classnames, split, shots=shots, seed=seed, subsample=subsample)
    return SampleSet(samples, [prompt_name(c) for c in classnames], [FGVC_TEMPLATE], transform)
