"""The ImageNet variants of the domain-generalisation protocol (test only), read from CoOp's layout.

Each folder holds CoOp's `classnames.txt` (the 1000 ImageNet `<wnid> <class name>` lines). ImageNet-V2
names its class folders 0..999 in that order; -Sketch, -A and -R use wnid folders, and -A and -R hold
only 200 of the classes: their labels run over the folders present, in sorted order, and
`imagenet_indices` maps each label to the `imagenet` reader's label (sorted wnid order), so that a
1000-way ImageNet classifier can be cut down to the subset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from clipdistill.data.pairs import Transform
from clipdistill.data.paper.common import SampleSet, need_dir, need_file, prompt_name, select
from clipdistill.data.paper.coop import IMAGENET_TEMPLATE, list_class_folders, read_wnid_names


@dataclass(frozen=True)
class VariantSpec:
    folder: str  # under root
    images: str  # under `folder`
    numbered: bool  # class folders named 0..999 (ImageNet-V2) rather than by wnid


VARIANTS = {
    "imagenet_v2": VariantSpec("imagenetv2", "imagenetv2-matched-frequency-format-val", True),
    "imagenet_sketch": VariantSpec("imagenet-sketch", "images", False),
    "imagenet_a": VariantSpec("imagenet-adversarial", "imagenet-a", False),
    "imagenet_r": VariantSpec("imagenet-rendition", "imagenet-r", False),
}


def build_variant(
    name: str,
    root: str | os.PathLike,
    split: str,
    transform: Transform,
    shots: int,
    seed: int,
    subsample: str,
) -> Dataset:
    spec = VARIANTS[name]
    class_dirs = "0..999" if spec.numbered else "<wnid>"
    layout = (
        f"CoOp layout: root/{spec.folder}/classnames.txt and root/{spec.folder}/{spec.images}/{class_dirs}/*"
    )
    folder = need_dir(Path(root) / spec.folder, name, layout)
    names_file = need_file(folder / "classnames.txt", name, layout)
    image_dir = need_dir(folder / spec.images, name, layout)
    names = read_wnid_names(names_file, name)
    in_file_order = list(names)
    if spec.numbered:  # folder i is the i-th line of classnames.txt
        wnids = in_file_order
        labels = {str(i): i for i in range(len(wnids))}
    else:
        present = sorted(e.name for e in os.scandir(image_dir) if e.is_dir() and not e.name.startswith("."))
        unknown = [w for w in present if w not in names]
        if unknown:
            raise ValueError(
                f"{name}: class folders {unknown[:5]} in {image_dir} are not listed in {names_file}"
            )
        wnids = present
        labels = {wnid: i for i, wnid in enumerate(wnids)}
    samples, classnames = select(
        name,
        lambda _: list_class_folders(image_dir, labels, name, names_file),
        [names[w] for w in wnids],
        split,
        splits=("test",),
        subsample=subsample,
        shots=shots,
        seed=seed,
    )
    dataset = SampleSet(samples, [prompt_name(c) for c in classnames], [IMAGENET_TEMPLATE], transform)
    imagenet_label = {wnid: i for i, wnid in enumerate(sorted(names))}  # the ImageNet reader's labels
    indices = [imagenet_label[w] for w in wnids]
    start = len(indices) - len(classnames) if subsample == "new" else 0
    dataset.imagenet_indices = indices[start : start + len(classnames)]
    return dataset
