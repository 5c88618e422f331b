"""The teacher embedding store: computed once by `embed`, memory-mapped by everything after it.

Layout of a cache folder:
    meta.json              fingerprint, sizes, shard size (written first; a mismatch is refused)
    emb_00000.npy          float16 [rows, image_dim + text_dim], L2-normalised embeddings
    shard_00000.json       ids and validity of the shard's rows (written last: the shard's done mark)
    valid.npy              bool [rows], every shard's validity in one array (written when all are done)
    manifest.npz           WebDataset data: records and valid records per tar shard, digests of their
                           keys (`ShardIndex`), so `train` maps a sample to its row without a key table
    teacher.json           the teacher's own logit scale (null for a model without one): what the
                           relational losses scale its similarities by (written last, on every `embed`)
With `embed.views N > 1` (a reinforced cache, `data/views.py`) each shard also has
    aug_00000.npy          float32 [rows, N, 5], every view's crop box and flip (view 0: the identity)
    views_00000.npy        float16 [rows, N - 1, image_dim], the teacher's image embedding of views 1..N-1
                           (view 0's is the image embedding in emb_00000.npy)
A teacher ensemble (`embed.ensemble`) keeps teacher 0 in the folder itself and teacher k's cache, laid out
the same, in `teacher<k>/`; meta.json lists their fingerprints. Readers get every teacher's
embeddings concatenated and scaled by 1/sqrt(K): unit vectors whose dot products are the mean of the
teachers' dot products, so similarity-based losses see the ensemble's averaged similarities and a
student projection learns every teacher's space at once.
A shard is computed from a fixed list of rows in fixed batches, so a resumed run writes the same
bytes as an uninterrupted one, and N processes (`torchrun ... embed`), each computing the shards
s with s % N == rank, write the same bytes as one.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipdistill import distributed
from clipdistill.checkpoint import atomic_write, read_json, save_npy, write_json
from clipdistill.data.pairs import ShardIndex
from clipdistill.data.views import IDENTITY, apply_views, view_params
from clipdistill.runs import sweep_temps


class CacheMismatchError(RuntimeError):
    """A cache built by another teacher, preprocessing or dataset."""


def teacher_fingerprint(
    model_id: str,
    weights_hash: str,
    preprocess: object,
    data_id: str,
    views: dict | None = None,
    members: list[str] | None = None,
) -> str:
    """The cache's identity; `views` (count and augmentation settings, N > 1) and the `members` of an
    ensemble (their fingerprints) enter it only when given, so a one-view, one-teacher cache keeps the
    fingerprint it always had."""
    parts = [model_id, weights_hash, repr(preprocess), data_id]
    if views is not None:
        parts.append(views)
    if members:
        parts.append(members)
    blob = json.dumps(parts, sort_keys=True)
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
    views: int = 1  # augmented views per sample (1: the plain cache)
    view_seed: int = 0  # seeds every view's crop and flip
    view_min_scale: float = 1.0  # smallest crop area, a fraction of the image
    ensemble: list[str] = field(default_factory=list)  # fingerprints of teachers 1.. (in teacher<k>/)

    def to_json(self) -> dict:
        """meta.json's content; a one-view, one-teacher cache writes exactly the keys it always wrote."""
        values = dict(self.__dict__)
        if self.views == 1:
            for key in ("views", "view_seed", "view_min_scale"):
                values.pop(key)
        if not self.ensemble:
            values.pop("ensemble")
        return values

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_samples))


class TeacherCache:
    """Read access to a finished cache: rows by sample index, memory-mapped shard by shard.

    For an ensemble, `meta` gives the combined widths (the sum of the teachers'), which is what
    `rows` and `view_rows` return; `layout` describes this folder's own files (teacher 0)."""

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
        self._extra: dict[tuple[str, int], np.ndarray] = {}  # a reinforced cache's views and aug shards
        if (self.folder / "valid.npy").is_file():
            self.valid = np.load(self.folder / "valid.npy", mmap_mode="r")
        else:  # a cache written before valid.npy existed
            self.valid = shard_validity(self.folder, self.meta.num_shards)
        self.layout = self.meta
        self.members = [
            TeacherCache(member_dir(self.folder, k)) for k in range(1, len(self.meta.ensemble) + 1)
        ]
        for k, (member, expected) in enumerate(zip(self.members, self.meta.ensemble, strict=True), start=1):
            if member.meta.fingerprint != expected or member.meta.num_samples != self.meta.num_samples:
                raise CacheMismatchError(
                    f"teacher {k} of the ensemble cache at {self.folder} ({member.folder}) is not the one it "
                    f"was built with: delete {self.folder} and rerun `clipdistill embed`"
                )
        if self.members:
            self.valid = np.logical_and.reduce([np.asarray(self.valid)] + [m.valid for m in self.members])
            self.meta = replace(
                self.meta,
                image_dim=sum(m.meta.image_dim for m in [self, *self.members]),
                text_dim=sum(m.meta.text_dim for m in [self, *self.members]),
            )

    @property
    def logit_scale(self) -> float | None:
        """The teacher's own logit scale (an ensemble's: the teachers' mean, as its similarities are);
        None when a teacher has none, or the cache predates `teacher.json`."""
        scales = []
        for cache in (self, *self.members):
            path = cache.folder / "teacher.json"
            scales.append(read_json(path).get("logit_scale") if path.is_file() else None)
        return None if None in scales else sum(scales) / len(scales)

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
                f"teacher cache at {self.folder} was built from data {self.meta.data_id!r}, not {data_id!r} "
                "(a table is identified by its contents, shards by their sizes and modification times: "
                "edited data is new data): rerun `clipdistill "
                "embed` for this data (or point --run_dir at the matching run)"
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
        emb = torch.from_numpy(self._gather(index, "emb")).float()
        image, text = emb[:, : self.layout.image_dim], emb[:, self.layout.image_dim :]
        if not self.members:
            return image, text
        parts = [(image, text)] + [m.rows(index) for m in self.members]
        return combine([p[0] for p in parts]), combine([p[1] for p in parts])

    def view_rows(
        self, index: torch.Tensor | np.ndarray, view: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embedding of each sample's `view`, text embedding, that view's crop and flip
        parameters [B, 5]) for the given sample indices; view 0 is the plain image."""
        index, view = np.asarray(index, dtype=np.int64), np.asarray(view, dtype=np.int64)
        if len(view) != len(index) or (view < 0).any() or (view >= self.meta.views).any():
            raise ValueError(f"views must be in 0..{self.meta.views - 1}, one per row")
        emb = torch.from_numpy(self._gather(index, "emb")).float()
        image, text = emb[:, : self.layout.image_dim], emb[:, self.layout.image_dim :]
        augmented = view > 0
        if augmented.any():
            extra = self._gather(index[augmented], "views")  # [b, N - 1, image_dim]
            image[torch.from_numpy(augmented)] = torch.from_numpy(
                extra[np.arange(len(extra)), view[augmented] - 1]
            ).float()
        params = self._gather(index, "aug")[np.arange(len(index)), view] if self.meta.views > 1 else None
        if params is None:
            params = np.tile(np.asarray(IDENTITY, dtype=np.float32), (len(index), 1))
        if self.members:
            parts = [(image, text)] + [m.view_rows(index, view)[:2] for m in self.members]
            image, text = combine([p[0] for p in parts]), combine([p[1] for p in parts])
        return image, text, torch.from_numpy(np.ascontiguousarray(params))

    def _gather(self, index: np.ndarray, kind: str) -> np.ndarray:
        """Rows `index` of the shards' `kind` arrays (emb, views, aug), in order."""
        shard, offset = np.divmod(index, self.meta.shard_size)
        out = None
        for s in np.unique(shard):
            hit = shard == s
            part = self._shard(int(s), kind)
            if out is None:
                out = np.empty((len(index), *part.shape[1:]), dtype=part.dtype)
            out[hit] = part[offset[hit]]
        if out is None:  # no row asked for
            out = np.empty((0, *self._shard(0, kind).shape[1:]), dtype=self._shard(0, kind).dtype)
        return out

    def all_image(self, chunk: int = 65536):
        """Image embeddings shard by shard (memory-mapped views; an ensemble's combined, in memory)."""
        for s in range(self.meta.num_shards):
            if self.members:
                yield self.rows(np.asarray(self.meta.shard_rows(s)))[0].numpy()
            else:
                yield self._shard(s)[:, : self.meta.image_dim]

    def _shard(self, s: int, kind: str = "emb") -> np.ndarray:
        if kind != "emb":
            key = (kind, s)
            if key not in self._extra:
                self._extra[key] = np.load(self.folder / f"{kind}_{s:05d}.npy", mmap_mode="r")
            return self._extra[key]
        if s not in self._shards:
            self._shards[s] = np.load(self.folder / f"emb_{s:05d}.npy", mmap_mode="r")
        return self._shards[s]


def member_dir(folder: str | Path, k: int) -> Path:
    """The cache folder of teacher `k` >= 1 of an ensemble, inside the ensemble's folder."""
    return Path(folder) / f"teacher{k}"


def combine(parts: list[torch.Tensor]) -> torch.Tensor:
    """The teachers' unit-norm embeddings side by side, scaled by 1/sqrt(K): a unit vector whose dot
    product with another is the teachers' mean dot product."""
    return torch.cat(parts, dim=1) / math.sqrt(len(parts))


@torch.no_grad()
def embed_shard(
    teacher,
    batches,
    rows: range,
    meta: CacheMeta,
    device: torch.device,
    progress: tqdm | None = None,
    views: np.ndarray | None = None,
    plain: np.ndarray | None = None,
) -> tuple[np.ndarray, dict, np.ndarray | None]:
    """Encode one shard's rows: normalised image and text embeddings as float16, zeros for bad samples;
    with `views` (the rows' view parameters [rows, N, 5]) also the image embeddings of views 1..N-1.
    `plain`, the shard's rows of this teacher's plain cache, stands for the image and text embeddings
    (they are those bytes): only the views are computed."""
    emb = np.zeros((len(rows), meta.image_dim + meta.text_dim), dtype=np.float16)
    if plain is not None:
        emb[:] = plain
    view_emb = None
    if views is not None:
        view_emb = np.zeros((len(rows), views.shape[1] - 1, meta.image_dim), dtype=np.float16)
    valid = np.zeros(len(rows), dtype=bool)
    ids = [""] * len(rows)
    skipped = []
    for batch in batches:
        skipped.extend([reason, str(key)] for reason, key in batch["skipped"])
        if progress is not None:
            progress.update(len(batch["index"]) + len(batch["skipped"]))
        if len(batch["index"]) == 0:
            continue
        pixels = batch["image"].to(device)
        local = batch["index"].numpy() - rows.start
        if plain is None:
            image = F.normalize(teacher.encode_image(pixels).float(), dim=-1)
            text = F.normalize(teacher.encode_text(batch["text"].to(device)).float(), dim=-1)
            emb[local] = torch.cat([image, text], dim=1).cpu().half().numpy()
        if view_emb is not None:
            params = torch.from_numpy(views[local])
            for v in range(1, views.shape[1]):
                seen = teacher.encode_image(apply_views(pixels, params[:, v]))
                view_emb[local, v - 1] = F.normalize(seen.float(), dim=-1).cpu().half().numpy()
        valid[local] = True
        for row, key in zip(local, batch.get("id") or batch["index"].tolist(), strict=True):
            ids[row] = str(key)
    return emb, {"ids": ids, "valid": valid.tolist(), "skipped": skipped}, view_emb


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


def own_logit_scale(teacher: torch.nn.Module) -> float | None:
    """The scale a CLIP model multiplies its cosine similarities by (exp of its learnt log), or None."""
    log_scale = getattr(teacher, "logit_scale", None)
    if not isinstance(log_scale, torch.Tensor) or log_scale.numel() != 1:
        return None
    return float(log_scale.detach().float().exp())


# CacheMeta's fields as a refusal names them
META_NAMES = {
    "model_id": "teacher", "data_id": "data", "fingerprint": "fingerprint", "num_samples": "samples",
    "image_dim": "image width", "text_dim": "text width", "shard_size": "shard size", "views": "views",
    "view_seed": "view seed", "view_min_scale": "view min scale", "ensemble": "ensemble",
}  # fmt: skip


def build_cache(
    folder: str | Path,
    meta: CacheMeta,
    teacher,
    source,
    batch_size: int,
    device: torch.device,
    plain: TeacherCache | None = None,
) -> dict:
    """Compute (or finish) the cache; returns a report with timing and skipped-sample counts.

    Under torchrun each rank computes the unfinished shards s with s % world_size == rank; rank 0
    writes the metadata before and `valid.npy` after. `plain`, this teacher's finished plain cache of
    the same data and shard size, gives the image and text embeddings: only views are computed.
    """
    folder = Path(folder)
    meta_path = folder / "meta.json"
    rank, world = distributed.rank(), distributed.world_size()
    if meta_path.is_file():
        old = CacheMeta(**read_json(meta_path))
        if old != meta:
            changed = [
                f"{name} {getattr(old, key)} -> {getattr(meta, key)}"
                for key, name in META_NAMES.items()
                if getattr(old, key) != getattr(meta, key)
            ]
            raise CacheMismatchError(
                f"the cache at {folder} was started with other settings ({'; '.join(changed)}). "
                f"Delete {folder} to rebuild it"
            )
    elif rank == 0:
        write_json(meta_path, meta.to_json())
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
    for s in todo:
        rows = meta.shard_rows(s)
        index = np.arange(rows.start, rows.stop)
        views = None
        if meta.views > 1:
            views = view_params(meta.view_seed, index, meta.views, meta.view_min_scale)
        batches = source.batches(np.array_split(index, -(-len(index) // batch_size)))
        reused = None if plain is None else np.asarray(plain._shard(s))
        emb, record, view_emb = embed_shard(teacher, batches, rows, meta, device, progress, views, reused)
        save_npy(folder / f"emb_{s:05d}.npy", emb)
        if views is not None:
            save_npy(folder / f"aug_{s:05d}.npy", views)
            save_npy(folder / f"views_{s:05d}.npy", view_emb)
        write_json(folder / f"shard_{s:05d}.json", record)  # the shard's done mark, written last
        skipped += len(record["skipped"])
    progress.close()
    skipped = sum(distributed.all_gather_objects(skipped))
    if rank == 0 and not (folder / "valid.npy").is_file():
        save_npy(folder / "valid.npy", shard_validity(folder, meta.num_shards))
    if rank == 0:  # also on a finished cache, so one built before this file existed gains it
        write_json(folder / "teacher.json", {"logit_scale": own_logit_scale(teacher)})
    distributed.barrier()
    computed = sum(distributed.all_gather_objects(len(todo)))
    return {"shards_computed": computed, "seconds": time.time() - start, "skipped_in_this_run": skipped}
