"""A paper dataset's split as image-caption pairs, so `embed` and `train` read it like a table of files.

The caption is the image's class name in the dataset's first prompt template: `embed` needs a text per
image, and the ComKD stages never read it (stage 2 learns from the images alone, stage 1 looks labels up
by row). A sample's row in the split is its `index` and its row in the teacher cache.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from clipdistill.config import ConfigError, DataConfig
from clipdistill.data.pairs import Transform
from clipdistill.data.paper import DATASETS, build_dataset


def paper_split(cfg: DataConfig, split: str, transform: Transform | None, **protocol) -> Dataset:
    """`split` of the dataset `data.kind paper` names, with `protocol` (shots, seed, subsample)."""
    if cfg.dataset not in DATASETS or not cfg.path:
        raise ConfigError(
            f"data.kind paper needs data.dataset (one of {', '.join(DATASETS)}; got {cfg.dataset!r}) and "
            "data.path, the folder that holds the datasets' folders (for image_folder: the folder that holds "
            "train/, val/ and test/)"
        )
    return build_dataset(cfg.dataset, cfg.path, split, transform, **protocol)


class LabelledPairs(Dataset):
    """`(image, label)` samples as pair records; a bad image stays the bad-sample record it already is."""

    def __init__(self, labelled: Dataset):
        self.labelled = labelled
        self.captions = [labelled.templates[0].format(c=name) for name in labelled.classnames]

    def __len__(self) -> int:
        return len(self.labelled)

    def __getitem__(self, i: int) -> dict:
        sample = self.labelled[i]
        if isinstance(sample, dict):
            return {**sample, "id": str(sample["id"]), "index": i}
        image, label = sample
        return {"image": image, "text": self.captions[label], "index": i, "id": str(i)}
