"""Where training and embedding batches come from: the in-memory lab, a table of files, tar shards, or
one of the papers' datasets.

Every source yields dicts with `image` (normalised float [B, 3, S, S]), `text` (tokens), `index`
(the sample's row in the dataset, which is also its row in the teacher cache) and `skipped`
(bad samples met in this batch, as (reason, id) pairs).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from clipdistill.config import DataConfig
from clipdistill.data.lab import LabSplit, load_lab, to_pixels
from clipdistill.models.factory import Preprocess


def pil_transform(preprocess: Preprocess) -> Callable:
    """PIL image -> normalised tensor at the model's resolution (CLIP's resize + center crop)."""
    return T.Compose(
        [
            T.Resize(preprocess.image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(preprocess.image_size),
            T.ToTensor(),
            T.Normalize(preprocess.mean, preprocess.std),
        ]
    )


class LabPairs:
    """A lab split as a random-access pair source: batches are tensor slices, no workers needed."""

    def __init__(self, split: LabSplit, tokenizer: Callable, preprocess: Preprocess):
        self.split = split
        self.preprocess = preprocess
        # The lab's captions repeat (a few hundred distinct strings over 60k images): tokenize each once.
        distinct, rows = np.unique(np.asarray(split.captions), return_inverse=True)
        self.tokens = tokenizer(distinct.tolist())[torch.from_numpy(rows.reshape(-1))]

    def __len__(self) -> int:
        return len(self.split)

    def batch(self, index: torch.Tensor) -> dict:
        pixels = to_pixels(self.split.images[index], self.preprocess.image_size)
        return {
            "image": self.preprocess.normalize(pixels),
            "text": self.tokens[index],
            "index": index,
            "skipped": [],
        }

    def batches(self, index_lists: Iterable[np.ndarray]) -> Iterator[dict]:
        for rows in index_lists:
            yield self.batch(torch.as_tensor(rows, dtype=torch.long))


class DatasetPairs:
    """Pair records of a random-access dataset (files on disk), decoded by DataLoader workers."""

    def __init__(self, dataset: Dataset, tokenizer: Callable, num_workers: int):
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.dataset)

    def _collate(self, samples: list[dict]) -> dict:
        from clipdistill.data.pairs import collate_pairs

        batch = collate_pairs(samples)
        batch["text"] = self.tokenizer(batch["text"]) if batch.get("text") else None
        return batch

    def batches(self, index_lists: Iterable[np.ndarray]) -> Iterator[dict]:
        loader = DataLoader(
            self.dataset,
            batch_sampler=[list(map(int, rows)) for rows in index_lists],
            collate_fn=self._collate,
            num_workers=self.num_workers,
            persistent_workers=False,
        )
        yield from loader


class TablePairs(DatasetPairs):
    """Pairs listed in a CSV/TSV/Parquet table."""

    def __init__(self, cfg: DataConfig, tokenizer: Callable, preprocess: Preprocess):
        from clipdistill.data.pairs import PairsDataset

        dataset = PairsDataset(
            cfg.path,
            pil_transform(preprocess),
            image_key=cfg.image_key,
            caption_key=cfg.caption_key,
            id_key=cfg.id_key or None,
        )
        super().__init__(dataset, tokenizer, cfg.num_workers)


class PaperPairs(DatasetPairs):
    """A split of one of the papers' datasets (`data.dataset` under `data.path`), every class, every image."""

    def __init__(self, cfg: DataConfig, tokenizer: Callable, preprocess: Preprocess, split: str = "train"):
        from clipdistill.data.paper.pairs import LabelledPairs, paper_split

        labelled = paper_split(cfg, split, pil_transform(preprocess))
        super().__init__(LabelledPairs(labelled), tokenizer, cfg.num_workers)


class ShardPairs:
    """WebDataset tar shards. `embed` streams them in order (stream position = cache row); `train`
    streams them shard-shuffled per epoch and finds each sample's cache row by its key."""

    def __init__(self, cfg: DataConfig, tokenizer: Callable, preprocess: Preprocess):
        from clipdistill.data.pairs import count_shard_samples, expand_urls

        self.urls = cfg.path
        self.transform = pil_transform(preprocess)
        self.tokenizer = tokenizer
        self.num_workers = cfg.num_workers
        self._counts = [count_shard_samples(url) for url in expand_urls(cfg.path)]

    def __len__(self) -> int:
        return sum(self._counts)

    def _collate(self, samples: list[dict]) -> dict:
        from clipdistill.data.pairs import collate_pairs

        batch = collate_pairs(samples)
        batch["text"] = self.tokenizer(batch["text"]) if batch.get("text") else None
        return batch

    def batches(self, index_lists: Iterable[np.ndarray]) -> Iterator[dict]:
        """Consecutive rows only (what `embed` asks for): one ordered stream, no workers."""
        from clipdistill.data.pairs import WebDatasetPairs

        lists = [np.asarray(rows) for rows in index_lists]
        if not lists:
            return
        flat = np.concatenate(lists)
        if not np.array_equal(flat, np.arange(flat[0], flat[0] + len(flat))):
            raise ValueError("WebDataset shards are read in order: ask for consecutive rows")
        stream = iter(WebDatasetPairs(self.urls, self.transform, skip=int(flat[0])))
        for rows in lists:  # a stream shorter than counted (a cut shard) leaves its rows invalid
            samples = list(itertools.islice(stream, len(rows)))
            if samples:
                yield self._collate(samples)

    def stream(
        self,
        local_batch: int,
        seed: int,
        rank: int,
        world_size: int,
        start_step: int,
        pool: np.ndarray | None = None,
    ) -> Iterator[dict]:
        """Training batches: shards shuffled per epoch, split across ranks; resumes by skipping samples.

        `pool` (the training pool: stream rows, which are cache rows) keeps only those samples, so a
        subset or the cache's bad samples are dropped before decoding; None streams every sample.
        """
        from clipdistill.data.pairs import WebDatasetPairs

        keep = None
        if pool is not None and len(pool) < len(self):
            mask = np.zeros(len(self), dtype=bool)
            mask[pool] = True
            keep = np.split(mask, np.cumsum(self._counts)[:-1])
        epoch, skip = 0, start_step * local_batch
        while True:
            dataset = WebDatasetPairs(
                self.urls,
                self.transform,
                rank=rank,
                world_size=world_size,
                shuffle_shards=True,
                seed=seed,
                epoch=epoch,
                skip=skip,
                keep=keep,
            )
            loader = DataLoader(
                dataset,
                batch_size=local_batch,
                collate_fn=self._collate,
                num_workers=self.num_workers,
                drop_last=True,
            )
            produced = 0
            for batch in loader:
                produced += 1
                yield batch
            if produced == 0 and skip == 0:
                raise ValueError(f"no full batch of {local_batch} samples in {self.urls} for rank {rank}")
            epoch, skip = epoch + 1, 0


def make_pair_source(cfg: DataConfig, tokenizer: Callable, preprocess: Preprocess, split: str = "train"):
    """The pair source for `cfg` (the lab's or a paper dataset's `split`, a table of files, or shards)."""
    if cfg.kind == "lab":
        return LabPairs(getattr(load_lab(cfg), split), tokenizer, preprocess)
    if cfg.kind == "csv":
        return TablePairs(cfg, tokenizer, preprocess)
    if cfg.kind == "webdataset":
        return ShardPairs(cfg, tokenizer, preprocess)
    if cfg.kind == "paper":
        return PaperPairs(cfg, tokenizer, preprocess, split)
    raise ValueError(
        f"unknown data.kind {cfg.kind!r} for pairs; use lab, csv (csv/tsv/parquet), webdataset or paper "
        "(folder, a labelled folder tree, is read by eval only)"
    )


class StepSampler:
    """Which samples step `s` sees, as a pure function of (seed, s).

    Each epoch is a seeded permutation of the pool; step s takes the s-th global batch of it and
    this rank takes its contiguous slice. Resuming needs only the step number, and N ranks see
    exactly the global batch one process would.
    """

    def __init__(self, pool: np.ndarray, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        if len(pool) < global_batch:
            raise ValueError(f"only {len(pool)} training samples for a global batch of {global_batch}")
        self.pool = np.asarray(pool, dtype=np.int64)
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.seed, self.rank = seed, rank
        self.steps_per_epoch = len(self.pool) // global_batch
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.pool))
        rows = self._perm[position * self.global_batch : (position + 1) * self.global_batch]
        start = self.rank * self.local_batch
        return self.pool[rows[start : start + self.local_batch]]

    def schedule(self, start: int, stop: int) -> Iterator[np.ndarray]:
        for step in range(start, stop):
            yield self.indices(step)
