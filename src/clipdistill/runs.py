"""The layout of a run folder (`run_dir`): where every stage reads and writes, in one place.

`<run_dir>/cache/` (or `cache_<domain>/` for a lab target domain) holds the teacher cache,
`<run_dir>/<name>/` each trained model; a multi-seed lab names a row's run `<row>_seed<N>`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from clipdistill.config import ConfigError, RunConfig


def model_name(cfg: RunConfig, chosen: str = "") -> str:
    """The train folder a stage works on: the one `chosen` (eval.model, export.model), else this
    config's own run (`train.name`, else the method's name)."""
    return chosen or cfg.train.name or cfg.train.method


def model_dir(cfg: RunConfig, name: str) -> Path:
    """The folder of train run `name`."""
    return Path(cfg.run_dir) / name


def output_dir(cfg: RunConfig) -> Path:
    """Where `train` writes this config's run."""
    return model_dir(cfg, model_name(cfg))


def cache_dir(cfg: RunConfig) -> Path:
    """The run's teacher cache; a lab target domain (cross-dataset distillation), a reinforced cache
    of N views (`embed.views`) and a teacher ensemble (`embed.ensemble`) have their own."""
    name = f"cache_{cfg.data.domain}" if cfg.data.domain else "cache"
    if cfg.embed.views > 1:
        name += f"_views{cfg.embed.views}"
    if cfg.embed.ensemble:
        name += f"_ensemble{len(cfg.embed.ensemble) + 1}"
    return Path(cfg.run_dir) / name


def data_id(cfg: RunConfig) -> str:
    """Identity of the training samples: what the teacher cache is keyed on."""
    d = cfg.data
    if d.kind == "paper":  # the dataset's whole train split: stage 1's few-shot images are rows of it
        return f"paper:{d.dataset}:{d.path}"
    if d.kind == "csv":  # by content and the columns read: an edited table, or another caption column,
        # is other data; a moved table, or another cwd, is not
        columns = f"{d.image_key},{d.caption_key}"
        return f"csv:sha256-{table_digest(d.path)}:{columns}"
    if d.kind == "webdataset":  # other members read, or a shard edited in place, are other data; the same
        # shards named from another working folder (or copied with their times kept) are not
        from clipdistill.data.sources import shard_members

        members = "/".join(",".join(exts) for exts in shard_members(d))
        stamp = shards_stamp(d.path)
        return f"webdataset:{members}:files-{stamp}"
    return f"{d.kind}:{d.path or 'default'}:val{d.val_size}:train{d.train_size}"  # the lab's split sizes


def table_file(path: str) -> Path:
    """`data.path` of a table of pairs, refused in one line when it is missing or a folder."""
    file = Path(path)
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "does not exist"
        raise ConfigError(f"data.path {path!r} {what}: give the CSV, TSV or Parquet table of pairs")
    return file


def table_digest(path: str) -> str:
    """The first 16 hex digits of the sha256 of a table's bytes, hashed once per version of the file."""
    file = table_file(path)
    stat = file.stat()
    return _file_digest(file.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.cache
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def shards_stamp(urls: str) -> str:
    """A digest of every shard's size and modification time. Rewriting a shard (other images or captions
    under the same keys) changes them; one stat per shard and no byte read keeps it instant on a corpus
    of terabytes, where hashing the bytes would read it all before every stage. A copy that keeps the
    times (`cp -p`, `rsync -a`) keeps the stamp; touching a shard changes it."""
    from clipdistill.data.pairs import shard_files

    stats = [os.stat(path) for path in shard_files(urls)]
    blob = "\n".join(f"{stat.st_size} {stat.st_mtime_ns}" for stat in stats)  # in order
    return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


def run_path(cfg: RunConfig, path: str) -> Path:
    """A path option (train.subset, cluster.subset): relative ones are inside the run folder."""
    return Path(path) if Path(path).is_absolute() else Path(cfg.run_dir) / path


def seed_run_name(row: str, seed: int, seeds: list[int]) -> str:
    """A lab row's train folder for `seed`: the row itself, or `<row>_seed<N>` when it runs several seeds."""
    return row if len(seeds) == 1 else f"{row}_seed{seed}"


def find_run(cfg: RunConfig, name: str, needed: str) -> Path | None:
    """Folder `name` of the run dir holding `needed`, or (a multi-seed lab) the run of the same seed."""
    configured = model_dir(cfg, name)
    for folder in (configured, Path(f"{configured}_seed{cfg.train.seed}")):
        if (folder / needed).is_file():
            return folder
    return None


class FolderBusyError(RuntimeError):
    """Another process is writing the stage folder this one was asked to write."""


@contextlib.contextmanager
def exclusive(folder: Path) -> Iterator[None]:
    """Hold the lock of a stage's output folder while the stage writes it.

    A second process on the same folder (a command relaunched while the first still runs, two screens
    sharing a run dir) is refused, naming the holder: it would otherwise sweep the first one's
    half-written files away and interleave their logs. The lock is `.<folder>.lock` beside the folder,
    an flock that the kernel drops when its process ends (`kill -9` included), and the file goes with
    it. Under torchrun rank 0 holds it for every rank."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    folder = Path(folder)
    path = folder.parent / f".{folder.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _flocked(path, folder)
    try:
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} (`{' '.join(sys.argv)}`)")
        lock.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # before the flock goes, so no one locks a file that is gone
        lock.close()


def _flocked(path: Path, folder: Path) -> IO[str]:
    """The lock file, open and flocked by this process; one that its last holder removed between our
    open and our flock is opened anew (the folder is free then)."""
    while True:
        lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise FolderBusyError(
                f"{folder} is being written by {holder}: wait for it to finish, or stop it and rerun"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                return lock
        except FileNotFoundError:
            pass
        lock.close()


def sweep_temps(folder: Path, pattern: str = ".*.tmp") -> None:
    """Delete the half-written files of a killed run (see `checkpoint.atomic_path`): never read, garbage."""
    for stale in Path(folder).glob(pattern):
        stale.unlink(missing_ok=True)
