"""The teacher embedding store: computed once by `embed`, memory-mapped by everything after it.

Layout of a cache folder:
    meta.json              fingerprint, sizes, shard size (written first; a mismatch is refused)
    emb_00000.npy          float16 [rows, image_dim + text_dim], L2-normalised embeddings
    shard_00000.json       ids and validity of the shard's rows (written last: the shard's done mark)
    valid.npy              bool [rows], every shard's validity in one array (written when all are done)
    manifest.npz           WebDataset data: records and valid records per tar shard, digests of their
                           keys (`ShardIndex`), so `train` maps a sample to its row without a key table
A shard is computed from a fixed list of rows in fixed batches, so a resumed run writes the same
bytes as an uninterrupted one, and N processes (`torchrun ... embed`), each computing the shards
s with s % N == rank, write the same bytes as one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipdistill import distributed
from clipdistill.checkpoint import atomic_write, read_json, save_npy, write_json
from clipdistill.data.pairs import ShardIndex
from clipdistill.runs import sweep_temps


class CacheMismatchError(RuntimeError):
    """A cache built by another teacher, preprocessing or dataset."""


def teacher_fingerprint(model_id: str, weights_hash: str, preprocess: object, data_id: str) -> str:
    blob = json.dumps([model_id, weights_hash, repr(preprocess), data_id])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class CacheMeta:
    fingerprint: str
    model_id: str
    data_id: str
    num_samples: int
    image_dim: int
    text_dim: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_samples))


class TeacherCache:
    """Read access to a finished cache: rows by sample index, memory-mapped shard by shard."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / "meta.json").is_file():
            raise FileNotFoundError(f"no teacher cache at {self.folder}: run `clipdistill embed` first")
        self.meta = CacheMeta(**read_json(self.folder / "meta.json"))
        missing = [
            s for s in range(self.meta.num_shards) if not (self.folder / f"shard_{s:05d}.json").is_file()
        ]
        if missing:
            raise FileNotFoundError(
                f"teacher cache at {self.folder} is incomplete ({len(missing)} of "
                f"{self.meta.num_shards} shards missing): rerun `clipdistill embed` to finish it"
            )
        self._shards: dict[int, np.ndarray] = {}  # memory-mapped on first use: start-up reads no shard
        if (self.folder / "valid.npy").is_file():
            self.valid = np.load(self.folder / "valid.npy", mmap_mode="r")
        else:  # a cache written before valid.npy existed
            self.valid = shard_validity(self.folder, self.meta.num_shards)

    def manifest(self) -> tuple[ShardIndex, np.ndarray] | None:
        """The WebDataset manifest (the shards' index, valid records per shard), if `embed` wrote one."""
        path = self.folder / "manifest.npz"
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as saved:
            return ShardIndex(saved["counts"], saved["digests"]), saved["valid_counts"]

    def __len__(self) -> int:
        return self.meta.num_samples

    def check(self, data_id: str, fingerprint: str | None = None) -> None:
        """Refuse a cache built from other data (or, when given, by another teacher)."""
        if self.meta.data_id != data_id:
            raise CacheMismatchError(
                f"teacher cache at {self.folder} was built from data {self.meta.data_id!r}, not {data_id!r}: "
                "rerun `clipdistill embed` for this data (or point --run_dir at the matching run)"
            )
        if fingerprint is not None and self.meta.fingerprint != fingerprint:
            raise CacheMismatchError(
                f"teacher cache at {self.folder} was built by teacher {self.meta.model_id} "
                f"(fingerprint {self.meta.fingerprint}), not the configured one ({fingerprint}): "
                f"delete {self.folder} and rerun `clipdistill embed`"
            )

    def rows(self, index: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, text) float32 embeddings of the given sample indices, in order."""
        index = np.asarray(index, dtype=np.int64)
        out = np.empty((len(index), self.meta.image_dim + self.meta.text_dim), dtype=np.float16)
        shard, offset = np.divmod(index, self.meta.shard_size)
        for s in np.unique(shard):
            hit = shard == s
            out[hit] = self._shard(int(s))[offset[hit]]
        emb = torch.from_numpy(out).float()
        return emb[:, : self.meta.image_dim], emb[:, self.meta.image_dim :]

    def all_image(self, chunk: int = 65536):
        """Image embeddings shard by shard (memory-mapped views), for balance and cluster."""
        for s in range(self.meta.num_shards):
            yield self._shard(s)[:, : self.meta.image_dim]

    def _shard(self, s: int) -> np.ndarray:
        if s not in self._shards:
            self._shards[s] = np.load(self.folder / f"emb_{s:05d}.npy", mmap_mode="r")
        return self._shards[s]


@torch.no_grad()
def embed_shard(
    teacher, batches, rows: range, width: int, device: torch.device, progress: tqdm | None = None
) -> tuple[np.ndarray, dict]:
    """Encode one shard's rows: normalised image and text embeddings as float16, zeros for bad samples."""
    emb = np.zeros((len(rows), width), dtype=np.float16)
    valid = np.zeros(len(rows), dtype=bool)
    ids = [""] * len(rows)
    skipped = []
    for batch in batches:
        skipped.extend([reason, str(key)] for reason, key in batch["skipped"])
        if progress is not None:
            progress.update(len(batch["index"]) + len(batch["skipped"]))
        if len(batch["index"]) == 0:
            continue
        image = F.normalize(teacher.encode_image(batch["image"].to(device)).float(), dim=-1)
        text = F.normalize(teacher.encode_text(batch["text"].to(device)).float(), dim=-1)
        local = batch["index"].numpy() - rows.start
        emb[local] = torch.cat([image, text], dim=1).cpu().half().numpy()
        valid[local] = True
        for row, key in zip(local, batch.get("id") or batch["index"].tolist(), strict=True):
            ids[row] = str(key)
    return emb, {"ids": ids, "valid": valid.tolist(), "skipped": skipped}


def shard_validity(folder: Path, num_shards: int) -> np.ndarray:
    parts = [read_json(folder / f"shard_{s:05d}.json")["valid"] for s in range(num_shards)]
    return np.concatenate([np.asarray(part, dtype=bool) for part in parts])


def save_manifest(folder: str | Path, index: ShardIndex, valid: np.ndarray) -> None:
    """`manifest.npz` of a WebDataset cache: the shards' index and each tar shard's valid records."""
    valid_counts = np.add.reduceat(np.asarray(valid, dtype=np.int64), index.offsets)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
            np.savez(f, counts=index.counts, digests=index.digests, valid_counts=valid_counts)

    atomic_write(Path(folder) / "manifest.npz", write)


def check_manifest(folder: str | Path, index: ShardIndex) -> None:
    """Refuse to reuse a finished WebDataset cache whose shards have changed since."""
    path = Path(folder) / "manifest.npz"
    if not path.is_file():
        return
    with np.load(path, allow_pickle=False) as saved:
        same = all(np.array_equal(saved[k], getattr(index, k)) for k in ("counts", "digests"))
    if not same:
        raise CacheMismatchError(
            f"the shards changed since the cache at {folder} was built (other samples or keys): "
            f"delete {folder} and rerun `clipdistill embed`"
        )


def build_cache(
    folder: str | Path, meta: CacheMeta, teacher, source, batch_size: int, device: torch.device
) -> dict:
    """Compute (or finish) the cache; returns a report with timing and skipped-sample counts.

    Under torchrun each rank computes the unfinished shards s with s % world_size == rank; rank 0
    writes the metadata before and `valid.npy` after.
    """
    folder = Path(folder)
    meta_path = folder / "meta.json"
    rank, world = distributed.rank(), distributed.world_size()
    if meta_path.is_file():
        old = CacheMeta(**read_json(meta_path))
        if old != meta:
            raise CacheMismatchError(
                f"the cache at {folder} was started with other settings (teacher {old.model_id}, fingerprint "
                f"{old.fingerprint}, {old.num_samples} samples, shard size {old.shard_size}); now "
                f"{meta.model_id}, {meta.fingerprint}, {meta.num_samples}, {meta.shard_size}. "
                f"Delete {folder} to rebuild it"
            )
    elif rank == 0:
        write_json(meta_path, meta.__dict__)
    if rank == 0:
        sweep_temps(folder)  # half-written files of a killed run (see atomic_path)
    distributed.barrier()
    mine = range(rank, meta.num_shards, world)
    todo = [s for s in mine if not (folder / f"shard_{s:05d}.json").is_file()]
    start, skipped = time.time(), 0
    total = sum(len(meta.shard_rows(s)) for s in mine)
    progress = tqdm(
        total=total,
        initial=total - sum(len(meta.shard_rows(s)) for s in todo),
        desc="embed" if world == 1 else f"embed rank {rank}",
        unit="img",
        dynamic_ncols=True,
    )
    width = meta.image_dim + meta.text_dim
    for s in todo:
        rows = meta.shard_rows(s)
        index = np.arange(rows.start, rows.stop)
        batches = source.batches(np.array_split(index, -(-len(index) // batch_size)))
        emb, record = embed_shard(teacher, batches, rows, width, device, progress)
        save_npy(folder / f"emb_{s:05d}.npy", emb)
        write_json(folder / f"shard_{s:05d}.json", record)  # the shard's done mark, written last
        skipped += len(record["skipped"])
    progress.close()
    skipped = sum(distributed.all_gather_objects(skipped))
    if rank == 0 and not (folder / "valid.npy").is_file():
        save_npy(folder / "valid.npy", shard_validity(folder, meta.num_shards))
    distributed.barrier()
    computed = sum(distributed.all_gather_objects(len(todo)))
    return {"shards_computed": computed, "seconds": time.time() - start, "skipped_in_this_run": skipped}
