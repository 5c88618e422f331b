"""Shared fixtures: tiny runs (tiny student, tiny stand-in teacher, a few hundred images, CPU).

Trainer, cache and method tests read `synthetic_pairs`: generated images and captions in a CSV, the
path a user's own data takes. Tests of the Fashion-MNIST lab itself (evaluation, ComKD's labelled
classes) are marked `needs_lab` (the `lab` marker) and fail with an install hint when the dataset is
missing.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One thread, here and in the CLI subprocesses the tests start: on the 2 shared cores the tests get, the
# small ops of tiny models run several times faster than with threads contending, and a subprocess's
# numbers match an in-process run's bit for bit.
os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)

from clipdistill.config import RunConfig, load_config  # noqa: E402
from clipdistill.data.lab import DEBIAN_DIR  # noqa: E402

HAVE_LAB = (Path(DEBIAN_DIR) / "train-images-idx3-ubyte.gz").is_file()
needs_lab = pytest.mark.lab


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A lab test without the lab data fails, before its fixtures load the lab: it is never skipped."""
    if item.get_closest_marker("lab") and not HAVE_LAB:
        pytest.fail(
            f"Fashion-MNIST is not in {DEBIAN_DIR}: this test needs the lab data. `make test` installs it "
            "(apt-get install dataset-fashion-mnist); `pytest -m 'not lab'` leaves these tests out",
            pytrace=False,
        )


COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (220, 200, 40)}
SHAPES = ("square", "disc", "bar", "cross")


def write_pairs(folder: Path, size: int, seed: int = 0) -> Path:
    """`size` generated 32 px PNGs (a coloured shape at a random place, on noise) and `pairs.csv`
    (`filepath`, `title`: "a red disc"), the same for the same seed. Returns the CSV's path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    rows = []
    for i in range(size):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        cy, cx, r = *rng.integers(9, 23, size=2), int(rng.integers(4, 9))
        mask = {
            "square": (abs(yy - cy) <= r) & (abs(xx - cx) <= r),
            "disc": (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r,
            "bar": (abs(yy - cy) <= r // 3) & (abs(xx - cx) <= r),
            "cross": ((abs(yy - cy) <= 1) | (abs(xx - cx) <= 1)) & (abs(yy - cy) <= r) & (abs(xx - cx) <= r),
        }[shape]
        pixels = rng.integers(0, 60, size=(32, 32, 3))
        pixels[mask] = COLOURS[colour]
        name = f"{i:04d}.png"
        Image.fromarray(pixels.astype(np.uint8)).save(folder / name)
        rows.append({"filepath": str(folder / name), "title": f"a {colour} {shape}"})
    path = folder / "pairs.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "title"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A tar of `(name, bytes)` members, in order: a WebDataset shard when the names are `key.ext`."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def png_bytes(rng: np.random.Generator, side: int = 28) -> bytes:
    """A grey `side` px PNG of noise from `rng`."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(
    path: Path,
    keys: list[str],
    rng: np.random.Generator,
    bad_key: str | None = None,
    caption: str = "a photo of item",
) -> None:
    """A WebDataset shard of 28 px PNGs (`key.png`, noise from `rng`) and captions (`key.txt`:
    "CAPTION KEY"); `bad_key`'s image is a text file."""
    members = []
    for key in keys:
        image = png_bytes(rng)
        members += [(f"{key}.png", b"not an image" if key == bad_key else image),
                    (f"{key}.txt", f"{caption} {key}".encode())]  # fmt: skip
    write_tar(path, members)


@pytest.fixture(scope="session")
def synthetic_pairs(tmp_path_factory) -> Path:
    """The CSV of 256 generated image-text pairs (`data.kind csv`), shared by the whole session."""
    return write_pairs(tmp_path_factory.mktemp("pairs"), 256)


def tiny_overrides(run_dir: str | Path, *extra: str) -> list[str]:
    """`--section.key value` arguments of a lab run that trains in a second on CPU."""
    return [
        "--run_dir", str(run_dir),
        "--teacher.name", "lab-student-tiny",
        "--teacher.lock_text", "false",
        "--student.name", "lab-student-tiny",
        "--data.train_size", "256",
        "--data.val_size", "128",
        "--train.batch_size", "32",
        "--train.steps", "4",
        "--train.warmup_steps", "2",
        "--train.log_every", "1",
        "--train.ckpt_every", "2",
        "--train.device", "cpu",
        "--embed.batch_size", "64",
        "--embed.shard_size", "64",
        "--embed.device", "cpu",
        "--eval.device", "cpu",
        "--eval.linear_probe_train", "256",
        "--eval.retrieval_size", "128",
        *extra,
    ]  # fmt: skip


def pairs_overrides(run_dir: str | Path, pairs: str | Path, *extra: str) -> list[str]:
    """`tiny_overrides` training on the pairs of the CSV `pairs` instead of the lab (the shipped tiny
    model teaches there only as an explicitly random stand-in)."""
    return tiny_overrides(
        run_dir, "--data.kind", "csv", "--data.path", str(pairs), "--teacher.pretrained", "random", *extra
    )


@pytest.fixture
def tiny_config(tmp_path):
    """`tiny_config(*overrides, run_dir=...)` -> the resolved RunConfig of a tiny lab run."""

    def make(*extra: str, run_dir: str | Path | None = None) -> RunConfig:
        return load_config(None, tiny_overrides(run_dir or tmp_path / "run", *extra))

    return make


@pytest.fixture
def pairs_config(tmp_path, synthetic_pairs):
    """`pairs_config(*overrides, run_dir=...)` -> the RunConfig of a tiny run on `synthetic_pairs`."""

    def make(*extra: str, run_dir: str | Path | None = None) -> RunConfig:
        return load_config(None, pairs_overrides(run_dir or tmp_path / "run", synthetic_pairs, *extra))

    return make


def run_cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`python -m clipdistill.cli ARGS` in a fresh process; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "clipdistill.cli", *args], capture_output=True, text=True, **kwargs
    )


def kill_embed_after_a_shard(
    args: list[str], folder: Path, shard_delay: float, while_running: Callable | None = None
) -> int:
    """Start `clipdistill embed ARGS` with every shard slowed by `shard_delay` s, kill -9 it once
    `folder` holds a finished shard (calling `while_running(process)` first), and return how many
    shards it had finished."""
    slow_embed = (
        "import sys, time, clipdistill.cache as c; f = c.embed_shard; "
        f"c.embed_shard = lambda *a: (time.sleep({shard_delay}), f(*a))[1]; "
        "from clipdistill.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", slow_embed, "embed", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while not list(folder.glob("shard_*.json")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        if while_running is not None:
            while_running(proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "embed finished before it could be killed"
    return len(list(folder.glob("shard_*.json")))


def cached_pair_batch(size: int = 6, dim: int = 16, seed: int = 4) -> dict:
    """A random batch of images, tokens and unit-norm cached teacher embeddings, as `train` gives a
    task that reads the teacher cache."""
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(size, 3, 32, 32, generator=g),
        "text": torch.randint(1, 100, (size, 16), generator=g),
        "teacher_image": torch.nn.functional.normalize(torch.randn(size, dim, generator=g), dim=-1),
        "teacher_text": torch.nn.functional.normalize(torch.randn(size, dim, generator=g), dim=-1),
    }
