"""Image-text pairs from a table (CSV, TSV, Parquet) or from webdataset tar shards.

A sample is `{"image": Tensor[3, H, W], "text": str, "index": int, "id": str}`. A sample that
cannot be used becomes `{"bad": reason, "id": key, "index": i}`; `collate_pairs` moves those to
`batch["skipped"]`, so the main process counts them even when DataLoader workers did the reading.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
        min_side: int | None = None,
    ):
        self.path = Path(path)
        self.min_side = min_side  # JPEGs twice this side or more decode at reduced size (`decode_image`)
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
            image = decode_image(self.root / (self.images[i].as_py() or ""), min_side=self.min_side)
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


def shard_files(urls: str) -> list[str]:
    """The shards of `urls` (`expand_urls`), refused in one line when some are missing."""
    shards = expand_urls(urls)
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(shards)} shards in {urls!r} not found: {missing[:3]}"
        )
    return shards


def keys_digest(keys: list[str]) -> int:
    """A 63-bit digest of a shard's sample keys, in order: `train` checks that a shard is still the one
    `embed` read before it maps the shard's records to cache rows."""
    return int.from_bytes(hashlib.blake2b("\n".join(keys).encode(), digest_size=8).digest(), "little") >> 1


# the member extensions a sample's image and caption are read from by default, first found first
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
CAPTION_MEMBERS = ("txt", "caption")
UNREADABLE = -1  # the key digest of a shard that cannot be read (digests are 63-bit, never negative)


@dataclass
class ShardIndex:
    """What a list of shards holds, from their headers: records per shard (`count_shard_samples`) and
    the digest of each shard's keys. `embed` saves it next to the cache (`manifest.npz`), so `train`
    knows every record's cache row, `offsets[shard] + record`, without reading a tar or a key table."""

    counts: np.ndarray  # int64 [shards]
    digests: np.ndarray  # int64 [shards]; UNREADABLE for a shard without one readable sample

    @classmethod
    def scan(cls, shards: list[str]) -> ShardIndex:
        """A shard cut short counts its whole samples and one record for the cut; one that cannot be
        opened, or is cut before its first whole sample, is UNREADABLE (its sample count is unknown)."""
        counts, digests = np.zeros(len(shards), np.int64), np.full(len(shards), UNREADABLE, np.int64)
        for i, path in enumerate(shards):
            try:
                with tarfile.open(path) as tar:
                    groups, complete = _group_by_key(tar)
            except _TAR_ERRORS:
                continue
            if groups or complete:
                counts[i], digests[i] = len(groups) + (not complete), keys_digest([k for k, _ in groups])
        return cls(counts, digests)

    @property
    def unreadable(self) -> np.ndarray:
        """Positions of the shards without one readable sample."""
        return np.flatnonzero(self.digests == UNREADABLE)

    @property
    def offsets(self) -> np.ndarray:
        """Cache row of each shard's first record: shards are embedded in order."""
        return np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The order (positions in the shard list) every rank streams the shards in an epoch: shuffled by
    (seed, epoch). Shards are shuffled, not samples: mix samples when writing them."""
    order = list(range(num_shards))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


class ShardBatches(IterableDataset):
    """One rank's training batches of one epoch from webdataset shards, from batch `start` on.

    The epoch's stream is the kept records (`kept[i]` of shard i; `keep(i)` gives the mask) of the
    shards in `order`, the same on every rank. Global batch j is records [j * G, (j + 1) * G) of it
    (G = B x world size) and this rank's batch j is its slice of B records at rank x B: a pure function
    of (seed, epoch, j), so a run resumes exactly at any step and N ranks together train on the batches
    of one process, however the kept records are spread over the shards. DataLoader worker w builds
    batches start + w, start + w + W, ...: the loader's round-robin hands them back in order, and a
    worker opens only the shards its batches touch, reading the headers of the records before its own.
    A sample's `index` is its cache row. Bad records keep their place and reach the batch's `skipped`
    list.
    """

    def __init__(
        self,
        shards: list[str],
        index: ShardIndex,
        order: list[int],
        kept: np.ndarray,
        keep: Callable[[int], np.ndarray | None],
        batch_size: int,
        start: int,
        transform: Transform,
        collate: Callable[[list[dict]], dict],
        min_side: int | None = None,
        image_keys: tuple[str, ...] = IMAGE_MEMBERS,
        caption_keys: tuple[str, ...] = CAPTION_MEMBERS,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.shards, self.index, self.order, self.kept, self.keep = shards, index, order, kept, keep
        self.batch_size, self.start = batch_size, start
        self.stride, self.lead = batch_size * world_size, batch_size * rank  # global batch, our place in it
        self.num_batches = int(kept[order].sum()) // self.stride
        self.transform, self.collate, self.min_side = transform, collate, min_side
        self.image_keys, self.caption_keys = image_keys, caption_keys

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start)

    def _owned(self, position: int, worker: int, workers: int) -> bool:
        """Whether stream position `position` is in one of this rank's batches that `worker` builds."""
        batch, place = divmod(position - self.lead, self.stride)
        return (
            place < self.batch_size
            and self.start <= batch < self.num_batches
            and (batch - self.start) % workers == worker
        )

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        size, wanted = self.batch_size, set(self.image_keys) | set(self.caption_keys)
        offsets = self.index.offsets
        first, samples = 0, []  # stream position of the shard's first kept record
        for i in self.order:
            end = first + int(self.kept[i])
            # the first of this rank's batches whose slice ends after `first` (the shard's first record)
            batch = max((first - self.lead - size) // self.stride + 1, self.start)
            batch += (worker - (batch - self.start)) % workers  # this worker's first batch from there on
            if batch >= self.num_batches or batch * self.stride + self.lead >= end:
                first = end
                if first >= self.num_batches * self.stride:
                    return
                continue

            def read(k: int, first: int = first) -> bool:
                return self._owned(first + k, worker, workers)

            digest = int(self.index.digests[i])
            for record, raw in _read_shard(self.shards[i], digest, wanted, self.keep(i), read):
                if raw is not None:
                    samples.append(self._to_sample(raw, int(offsets[i]) + record))
                    if len(samples) == size:
                        yield self.collate(samples)
                        samples = []
            first = end

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
            image = decode_image(record[image_ext], name=key, min_side=self.min_side)
        except BadSample as e:
            return {"bad": e.reason, "id": key, "index": index}
        return {"image": self.transform(image), "text": text, "index": index, "id": key}


class ShardChangedError(RuntimeError):
    """A shard whose keys differ from the ones `embed` read: its records no longer match the cache."""


_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
# webdataset's split of a member name into sample key and extension: a/b/key.seg.png -> a/b/key, seg.png
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _read_shard(
    path: str,
    digest: int,
    wanted: set[str],
    keep: np.ndarray | None,
    read: Callable[[int], bool],
) -> Iterator[tuple[int, dict | None]]:
    """One shard's kept records as (record number, `{"__key__": key, ext: bytes}`), only `wanted`
    extensions read.

    Records whose `keep` entry is False are left out. The k-th kept record is read only if `read(k)`,
    else it comes out as None, from its header alone. A shard cut short ends with a `truncated_shard`
    record in place of its last sample, which may have lost members past the cut. `digest` (the
    `ShardIndex`'s, of a shard it could read) is checked against the shard's keys before any record
    is read.
    """

    def kept(record: int) -> bool:
        return keep is None or (record < len(keep) and bool(keep[record]))

    try:
        tar = tarfile.open(path)
    except _TAR_ERRORS:
        raise ShardChangedError(
            f"shard {path} was read when the shards were indexed but cannot be opened now; rerun "
            "`clipdistill embed`"
        ) from None
    with tar:
        groups, complete = _group_by_key(tar)
        if keys_digest([key for key, _ in groups]) != digest:
            raise ShardChangedError(
                f"shard {path} changed since `clipdistill embed` read it (other keys): its samples no "
                "longer match the teacher cache; rerun embed"
            )
        position = 0
        for record, (key, members) in enumerate(groups):
            if not kept(record):
                continue
            position += 1
            if not read(position - 1):
                yield record, None
                continue
            try:
                data = {ext: tar.extractfile(m).read() for ext, m in members.items() if ext in wanted}
            except _TAR_ERRORS:
                yield record, {"bad": "unreadable", "id": key}
                continue
            yield record, {"__key__": key, **data}
        if not complete and kept(len(groups)):
            cut = {"bad": "truncated_shard", "id": path}
            yield len(groups), (cut if read(position) else None)


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
