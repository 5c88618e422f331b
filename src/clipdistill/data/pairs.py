"""Image-text pairs from a table (CSV, TSV, Parquet) or from webdataset tar shards.

A sample is `{"image": Tensor[3, H, W], "text": str, "index": int, "id": str}`. A sample that
cannot be used becomes `{"bad": reason, "id": key, "index": i}`; `collate_pairs` moves those to
`batch["skipped"]`, so the main process counts them even when DataLoader workers did the reading.
"""

from __future__ import annotations

import os
import random
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
from braceexpand import braceexpand
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from clipdistill.data.images import BadSample, check_caption, decode_image

Transform = Callable[[Image.Image], torch.Tensor]


def collate_pairs(samples: list[dict]) -> dict:
    """Stack the good samples; list the bad ones as `batch["skipped"] = [(reason, id), ...]`.

    A batch in which every sample is bad has an empty `image` tensor and empty lists.
    """
    good = [s for s in samples if "bad" not in s]
    return {
        "image": torch.stack([s["image"] for s in good]) if good else torch.empty(0),
        "text": [s["text"] for s in good],
        "index": torch.tensor([s["index"] for s in good], dtype=torch.long),
        "id": [s["id"] for s in good],
        "skipped": [(s["bad"], s["id"]) for s in samples if "bad" in s],
    }


class PairsDataset(Dataset):
    """Pairs listed in a CSV, TSV or Parquet table; image paths are relative to the table's folder or `root`.

    Only the needed columns are kept, as Arrow arrays: compact, and not copied page by page into every
    forked DataLoader worker the way a list of Python strings is.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        transform: Transform,
        image_key: str = "filepath",
        caption_key: str = "title",
        id_key: str | None = None,
        root: str | os.PathLike | None = None,
        sep: str | None = None,
    ):
        self.path = Path(path)
        self.transform = transform
        self.root = Path(root) if root is not None else self.path.parent
        options = {image_key: "--data.image_key", caption_key: "--data.caption_key"}
        if id_key is not None:
            options[id_key] = "--data.id_key"
        table = _read_table(self.path, options, sep)
        self.images = table.column(image_key).combine_chunks()
        self.captions = table.column(caption_key).combine_chunks()
        self.ids = table.column(id_key).combine_chunks() if id_key is not None else None
        checked = ((self.images, image_key, "--data.image_key"), (self.ids, id_key, "--data.id_key"))
        for column, key, option in checked:
            if column is not None and not pa.types.is_string(column.type):
                raise ValueError(
                    f"{self.path}: column {key!r} is not valid UTF-8; re-encode the table as UTF-8 "
                    f"(or check {option})"
                )
        if self.ids is not None:
            _check_unique(self.ids, self.path, id_key)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        key = self.ids[i].as_py() if self.ids is not None else str(i)
        try:
            text = check_caption(self.captions[i].as_py(), name=f"{self.path} row {i} ({key})")
            image = decode_image(self.root / (self.images[i].as_py() or ""))
        except BadSample as e:
            return {"bad": e.reason, "id": key, "index": i}
        return {"image": self.transform(image), "text": text, "index": i, "id": key}


def _read_table(path: Path, options: dict[str, str], sep: str | None) -> pa.Table:
    """Read the columns named in `options` (column -> config option), all as strings."""
    columns = list(options)
    if path.suffix.lower() in (".parquet", ".pq"):
        present = pq.read_schema(path).names
        _check_columns(path, present, options)
        table = pq.read_table(path, columns=columns)
        return table.cast(pa.schema([(c, pa.string()) for c in columns]))
    if sep is None:
        sep = "\t" if ".tsv" in [s.lower() for s in path.suffixes] else ","
    parse = pacsv.ParseOptions(delimiter=sep, newlines_in_values=True)
    with pacsv.open_csv(path, parse_options=parse) as reader:
        present = reader.schema.names
    _check_columns(path, present, options)
    # read as bytes: one caption that is not UTF-8 is then a counted skip (check_caption), not a failed table
    convert = pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.binary() for c in columns})
    table = pacsv.read_csv(path, parse_options=parse, convert_options=convert)
    return pa.table({c: _utf8_or_bytes(table.column(c)) for c in columns})


def _utf8_or_bytes(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """The column as strings when all of it is valid UTF-8, else left as bytes."""
    try:
        return column.cast(pa.string())
    except pa.ArrowInvalid:
        return column


def _check_columns(path: Path, present: list[str], options: dict[str, str]) -> None:
    for column, option in options.items():
        if column not in present:
            raise ValueError(
                f"{path}: no column {column!r}; the columns are {present}. Set {option} to the right one."
            )


def _check_unique(ids: pa.Array, path: Path, id_key: str) -> None:
    counts = pc.value_counts(ids)
    duplicates = counts.filter(pc.greater(counts.field("counts"), 1)).field("values").to_pylist()
    if duplicates:
        raise ValueError(
            f"{path}: {len(duplicates)} duplicate ids in column {id_key!r}, e.g. {duplicates[:5]}; "
            "ids must be unique (drop the duplicate rows, or leave --data.id_key unset to use row numbers)."
        )


def expand_urls(urls: str) -> list[str]:
    """`a/{000..009}.tar::b/x.tar` -> the list of shards: `::` separates patterns, braces expand."""
    return [url for part in urls.split("::") if part.strip() for url in braceexpand(part.strip())]


class WebDatasetPairs(IterableDataset):
    """Pairs from local webdataset tar shards, read with `tarfile`.

    Shards are split over ranks (`rank::world_size`), then over DataLoader workers. With W workers,
    worker w's j-th record has `index = j * W + w`: the workers' streams interleaved sample by sample,
    which is this rank's whole stream when W <= 1. `skip=k` yields only records with index >= k, reading
    just the tar headers of the ones before; with W > 1 that resumes exactly when every worker had
    delivered the same number of records (a multiple of batch_size * W). Bad records take an index too.

    `keep` (one boolean mask per shard, in `urls` order, over the shard's records as
    `count_shard_samples` counts them) drops the other records before anything is decoded; they take
    no index, so `skip` counts kept records. This is how a training subset (cache rows) reaches a stream.

    Order is fixed by (seed, epoch): shards are shuffled, not samples, so mix samples when writing them.
    """

    def __init__(
        self,
        urls: str,
        transform: Transform,
        image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp"),
        caption_keys: tuple[str, ...] = ("txt", "caption"),
        rank: int = 0,
        world_size: int = 1,
        shuffle_shards: bool = False,
        seed: int = 0,
        epoch: int = 0,
        skip: int = 0,
        keep: list[np.ndarray] | None = None,
    ):
        self.shards = expand_urls(urls)
        missing = [s for s in self.shards if not os.path.isfile(s)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(self.shards)} shards in {urls!r} not found: {missing[:3]}"
            )
        if len(self.shards) < world_size:
            raise ValueError(f"{len(self.shards)} shards in {urls!r} cannot be split over {world_size} ranks")
        self.transform = transform
        self.image_keys = image_keys
        self.caption_keys = caption_keys
        self.rank = rank
        self.world_size = world_size
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.epoch = epoch
        self.skip = skip
        if keep is not None and len(keep) != len(self.shards):
            raise ValueError(f"keep has {len(keep)} masks for {len(self.shards)} shards")
        self.keep = keep

    def _rank_order(self) -> list[int]:
        """Positions in `self.shards` of this rank's shards, in the order of this (seed, epoch)."""
        order = list(range(len(self.shards)))
        if self.shuffle_shards:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order[self.rank :: self.world_size]

    def rank_shards(self) -> list[str]:
        """This rank's shards, in the order of this (seed, epoch)."""
        return [self.shards[i] for i in self._rank_order()]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        to_skip = max(0, -(-(self.skip - worker) // workers))  # own records whose index is below self.skip
        wanted = set(self.image_keys) | set(self.caption_keys)
        position = 0
        for i in self._rank_order()[worker::workers]:
            keep = None if self.keep is None else self.keep[i]
            for record in _read_shard(self.shards[i], max(0, to_skip - position), wanted, keep):
                if position >= to_skip:
                    yield self._to_sample(record, position * workers + worker)
                position += 1

    def _to_sample(self, record: dict, index: int) -> dict:
        if "bad" in record:
            return {**record, "index": index}
        key = record["__key__"]
        image_ext = next((ext for ext in self.image_keys if ext in record), None)
        caption_ext = next((ext for ext in self.caption_keys if ext in record), None)
        if image_ext is None or caption_ext is None:
            return {
                "bad": "missing_image" if image_ext is None else "missing_caption",
                "id": key,
                "index": index,
            }
        try:
            text = check_caption(record[caption_ext], name=key)
            image = decode_image(record[image_ext], name=key)
        except BadSample as e:
            return {"bad": e.reason, "id": key, "index": index}
        return {"image": self.transform(image), "text": text, "index": index, "id": key}


_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
# webdataset's split of a member name into sample key and extension: a/b/key.seg.png -> a/b/key, seg.png
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _read_shard(
    path: str, skip: int, wanted: set[str], keep: np.ndarray | None = None
) -> Iterator[dict | None]:
    """One shard's samples as `{"__key__": key, ext: bytes}` (only `wanted` extensions are read).

    Records whose `keep` entry is False are left out. Of the rest, the first `skip` come out as None,
    from the headers alone. A shard that cannot be opened yields one `unreadable_shard` record; a shard
    cut short ends with a `truncated_shard` record in place of its last sample, which may have lost
    members past the cut.
    """

    def kept(record: int) -> bool:
        return keep is None or (record < len(keep) and bool(keep[record]))

    try:
        tar = tarfile.open(path)
    except _TAR_ERRORS:
        if kept(0):
            yield {"bad": "unreadable_shard", "id": path}
        return
    with tar:
        groups, complete = _group_by_key(tar)
        for key, members in (group for i, group in enumerate(groups) if kept(i)):
            if skip > 0:
                skip -= 1
                yield None
                continue
            try:
                data = {ext: tar.extractfile(m).read() for ext, m in members.items() if ext in wanted}
            except _TAR_ERRORS:
                yield {"bad": "unreadable", "id": key}
                continue
            yield {"__key__": key, **data}
        if not complete and kept(len(groups)):
            yield {"bad": "truncated_shard", "id": path}


def _group_by_key(tar: tarfile.TarFile) -> tuple[list[tuple[str, dict[str, tarfile.TarInfo]]], bool]:
    """Group consecutive members by key, from the headers; also say whether the tar ends cleanly."""
    groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    try:
        for member in tar:
            match = _KEY_EXT.match(member.name)
            if not member.isfile() or match is None:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if groups and groups[-1][0] == key:
                groups[-1][1][ext] = member
            else:
                groups.append((key, {ext: member}))
        # a complete tar ends with zero blocks; a cut exactly between members leaves nothing there
        tar.fileobj.seek(tar.offset)
        complete = tar.fileobj.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE)
    except _TAR_ERRORS:
        complete = False
    if not complete and groups:
        groups.pop()
    return groups, complete


def count_shard_samples(path: str) -> int:
    """Records in one tar shard's stream (`_read_shard`), from its headers: one per sample, plus the bad
    record that stands for a cut shard's last sample, or for a whole unreadable shard. Counting that one
    too keeps stream positions and cache rows aligned past a bad shard."""
    try:
        with tarfile.open(path) as tar:
            groups, complete = _group_by_key(tar)
            return len(groups) + (not complete)
    except _TAR_ERRORS:
        return 1
