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
from torchvision.transforms.v2 import functional as TF

from clipdistill import distributed
from clipdistill.config import ConfigError, DataConfig
from clipdistill.data.lab import LabSplit, load_lab, to_pixels
from clipdistill.models.factory import Preprocess
from clipdistill.runs import table_file

UNREADABLE_NAMED = 10  # unreadable shards a refusal names


class ResizeCropNormalize:
    """RGB PIL image -> CLIP's bicubic resize (shorter side to `size`), centre crop and
    `(pixel / 255 - mean) / std`, as one CHW float tensor.

    The resize runs on the uint8 pixels with torch's antialiased bicubic kernel, which is vectorised:
    about 6x faster than PIL's on one core at 224 px and within one grey level of it. Only the
    cropped pixels are turned into floats, in one multiply-add (torchvision's ToTensor then Normalize
    make two float passes over the whole image).
    """

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]):
        self.size = size
        std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std_t

    def __call__(self, image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(image.convert("RGB") if image.mode != "RGB" else image))
        pixels = pixels.permute(2, 0, 1)
        pixels = TF.resize(pixels, [self.size], interpolation=T.InterpolationMode.BICUBIC, antialias=True)
        pixels = TF.center_crop(pixels, [self.size, self.size])
        out = torch.empty(pixels.shape, dtype=torch.float32)
        return out.copy_(pixels).mul_(self.scale).add_(self.shift)


def pil_transform(preprocess: Preprocess) -> Callable:
    """PIL image -> normalised tensor at the model's resolution (CLIP's resize + center crop)."""
    return ResizeCropNormalize(preprocess.image_size, preprocess.mean, preprocess.std)


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
            batch_sampler=(list(map(int, rows)) for rows in index_lists),  # lazily: the run's list is long
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
            table_file(cfg.path),
            pil_transform(preprocess),
            image_key=cfg.image_key,
            caption_key=cfg.caption_key,
            id_key=cfg.id_key or None,
            min_side=preprocess.image_size,
        )
        super().__init__(dataset, tokenizer, cfg.num_workers)


class PaperPairs(DatasetPairs):
    """A split of one of the papers' datasets (`data.dataset` under `data.path`), every class, every image."""

    def __init__(self, cfg: DataConfig, tokenizer: Callable, preprocess: Preprocess, split: str = "train"):
        from clipdistill.data.paper.pairs import LabelledPairs, paper_split

        labelled = paper_split(cfg, split, pil_transform(preprocess))
        super().__init__(LabelledPairs(labelled), tokenizer, cfg.num_workers)


class ShardPairs:
    """WebDataset tar shards. `embed` reads them in order (stream position = cache row) and saves their
    `ShardIndex` with the cache; `train` streams them shard-shuffled per epoch (`ShardBatches`), with
    every sample's cache row known from that index, so it reads no tar before its first batch."""

    def __init__(self, cfg: DataConfig, tokenizer: Callable, preprocess: Preprocess):
        from clipdistill.data.pairs import shard_files

        self.urls = cfg.path
        self.shards = shard_files(cfg.path)
        self.images, self.captions = shard_members(cfg)
        self.transform = pil_transform(preprocess)
        self.min_side = preprocess.image_size
        self.tokenizer = tokenizer
        self.num_workers = cfg.num_workers
        self._index = None

    @property
    def index(self):
        """The shards' `ShardIndex`: the cache's manifest when `use_index` gave it, else read from the
        headers (every rank reads its share when running under torchrun). A shard without one readable
        sample is refused, not counted as one bad sample: how many samples it lost is unknown, so
        `embed.max_skip_fraction` could not weigh it."""
        from clipdistill.data.pairs import ShardIndex

        if self._index is None:
            rank, world = distributed.rank(), distributed.world_size()
            mine = ShardIndex.scan(self.shards[rank::world])
            parts = distributed.all_gather_objects(mine)
            counts, digests = np.empty(len(self.shards), np.int64), np.empty(len(self.shards), np.int64)
            for r, part in enumerate(parts):
                counts[r::world], digests[r::world] = part.counts, part.digests
            index = ShardIndex(counts, digests)
            if len(index.unreadable):  # every rank holds the gathered index: all of them stop here
                named = ", ".join(self.shards[i] for i in index.unreadable[:UNREADABLE_NAMED])
                if len(index.unreadable) > UNREADABLE_NAMED:
                    named += f" and {len(index.unreadable) - UNREADABLE_NAMED} more"
                raise ValueError(
                    f"{len(index.unreadable)} of {len(self.shards)} shards in {self.urls!r} hold no readable "
                    "sample (not a tar archive, or cut inside its first sample), so how many samples they "
                    f"lost is unknown: {named}; repair or replace them, or leave them out of data.path"
                )
            self._index = index
        return self._index

    def use_index(self, index) -> None:
        if len(index.counts) != len(self.shards):
            raise ValueError(
                f"the cache's manifest lists {len(index.counts)} shards but {self.urls!r} has "
                f"{len(self.shards)}: rerun `clipdistill embed`"
            )
        self._index = index

    def __len__(self) -> int:
        return int(self.index.counts.sum())

    def _collate(self, samples: list[dict]) -> dict:
        from clipdistill.data.pairs import collate_pairs

        batch = collate_pairs(samples)
        batch["text"] = self.tokenizer(batch["text"]) if batch.get("text") else None
        return batch

    def batches(self, index_lists: Iterable[np.ndarray]) -> Iterator[dict]:
        """Consecutive rows only (what `embed` asks for): read in order from the shard holding the first."""
        from clipdistill.data.pairs import ShardBatches

        lists = [np.asarray(rows) for rows in index_lists]
        if not lists:
            return
        flat = np.concatenate(lists)
        if not np.array_equal(flat, np.arange(flat[0], flat[0] + len(flat))):
            raise ValueError("WebDataset shards are read in order: ask for consecutive rows")
        offsets = self.index.offsets
        first = int(np.searchsorted(offsets, flat[0], side="right")) - 1
        last = int(np.searchsorted(offsets, flat[-1], side="right"))
        order = list(range(first, last))
        records = ShardBatches(
            self.shards, self.index, order, self.index.counts, lambda i: None, 1,
            int(flat[0] - offsets[first]), self.transform, lambda samples: samples[0], self.min_side,
            self.images, self.captions,
        )  # fmt: skip
        stream = iter(records)
        for rows in lists:  # a stream shorter than counted (a cut shard) leaves its rows invalid
            samples = list(itertools.islice(stream, len(rows)))
            if samples:
                yield self._collate(samples)

    def stream(
        self,
        global_batch: int,
        seed: int,
        rank: int,
        world_size: int,
        start_step: int,
        cache=None,
        subset: np.ndarray | None = None,
    ) -> Iterator[dict]:
        """This rank's training batches from step `start_step` on: shards shuffled per epoch
        (`shard_order`), each global batch cut from the stream of their kept records and each rank given
        its slice (`ShardBatches`), so N ranks see the batches of one process, exactly resumable at any
        step. Too few kept records for one global batch are refused here, before any batch.

        With the teacher `cache` of these shards, its manifest replaces reading the tar headers and
        only the rows it holds as valid are read; `subset` (sorted rows; None: all) narrows them.
        """
        valid, valid_counts = None, None
        if cache is not None:
            manifest = cache.manifest()
            if manifest is not None:
                self.use_index(manifest[0])
                valid_counts = manifest[1]
            valid = cache.valid
        keep = KeptRows(self.index.offsets, self.index.counts, valid, subset)
        kept = keep.counts(valid_counts)
        self.pool_size = int(kept.sum())
        if self.pool_size < global_batch:
            raise ValueError(
                f"only {self.pool_size} samples of {self.urls!r} to train on (the valid ones, within "
                f"train.subset), fewer than a global batch of {global_batch}: lower train.batch_size"
            )
        return self._epochs(global_batch // world_size, seed, rank, world_size, start_step, keep, kept)

    def _epochs(self, local_batch, seed, rank, world_size, start_step, keep, kept) -> Iterator[dict]:
        from clipdistill.data.pairs import ShardBatches, shard_order

        per_epoch = int(kept.sum()) // (local_batch * world_size)  # global batches, the same every epoch
        epoch, start = divmod(start_step, per_epoch)
        while True:
            dataset = ShardBatches(
                self.shards, self.index, shard_order(len(self.shards), seed, epoch), kept, keep,
                local_batch, start, self.transform, self._collate, self.min_side, self.images,
                self.captions, rank, world_size,
            )  # fmt: skip
            loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers)
            yield from loader
            epoch, start = epoch + 1, 0


def shard_members(cfg: DataConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The member extensions a webdataset sample's image and caption are read from, first found first:
    `data.image_key` and `data.caption_key` as comma-separated lists (`jpg`, `png,webp`); left at
    their table defaults (`filepath`, `title`) they mean `IMAGE_MEMBERS` and `CAPTION_MEMBERS`."""
    from clipdistill.data.pairs import CAPTION_MEMBERS, IMAGE_MEMBERS

    default = DataConfig()
    images, captions = IMAGE_MEMBERS, CAPTION_MEMBERS
    if cfg.image_key != default.image_key:
        images = _extensions(cfg.image_key, "data.image_key")
    if cfg.caption_key != default.caption_key:
        captions = _extensions(cfg.caption_key, "data.caption_key")
    if "json" in captions:
        raise ConfigError(
            f"data.caption_key {cfg.caption_key!r}: a JSON member is not read as a caption (the caption "
            "would be the whole JSON text); name the member that holds the caption text, e.g. txt"
        )
    return images, captions


def _extensions(value: str, option: str) -> tuple[str, ...]:
    """`"jpg, .PNG"` -> ("jpg", "png")."""
    exts = tuple(ext.strip().lstrip(".").lower() for ext in value.split(",") if ext.strip())
    if not exts:
        raise ConfigError(f"{option} {value!r}: name the extension(s) of the shards' members, e.g. jpg")
    return exts


class KeptRows:
    """Which records of each shard training reads: valid ones (per the cache) within the subset, as
    one mask per shard, computed when the shard is opened."""

    def __init__(
        self, offsets: np.ndarray, counts: np.ndarray, valid: np.ndarray | None, subset: np.ndarray | None
    ):
        self.offsets, self.sizes, self.valid, self.subset = offsets, counts, valid, subset

    def __call__(self, shard: int) -> np.ndarray | None:
        if self.valid is None and self.subset is None:
            return None
        start, stop = int(self.offsets[shard]), int(self.offsets[shard] + self.sizes[shard])
        mask = np.ones(stop - start, dtype=bool) if self.valid is None else np.asarray(self.valid[start:stop])
        if self.subset is not None:
            lo, hi = np.searchsorted(self.subset, [start, stop])
            chosen = np.zeros(stop - start, dtype=bool)
            chosen[self.subset[lo:hi] - start] = True
            mask = mask & chosen
        return mask

    def counts(self, valid_counts: np.ndarray | None) -> np.ndarray:
        """Kept records per shard."""
        if self.subset is None:
            if self.valid is None:
                return self.sizes
            if valid_counts is not None:
                return valid_counts
            return np.add.reduceat(np.asarray(self.valid, dtype=np.int64), self.offsets)
        rows = self.subset if self.valid is None else self.subset[np.asarray(self.valid)[self.subset]]
        bounds = np.append(self.offsets, self.offsets[-1] + self.sizes[-1])
        return np.diff(np.searchsorted(rows, bounds)).astype(np.int64)


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
