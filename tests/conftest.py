"""Shared fixtures: a tiny lab run (tiny student, tiny stand-in teacher, a few hundred images, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One thread, here and in the CLI subprocesses the tests start: on the 2 shared cores the tests get, the
# small ops of tiny models run several times faster than with threads contending, and a subprocess's
# numbers match an in-process run's bit for bit.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from clipdistill.config import RunConfig, load_config  # noqa: E402
from clipdistill.data.lab import DEBIAN_DIR  # noqa: E402

HAVE_LAB = (Path(DEBIAN_DIR) / "train-images-idx3-ubyte.gz").is_file()
needs_lab = pytest.mark.skipif(
    not HAVE_LAB, reason=f"Fashion-MNIST is not in {DEBIAN_DIR}: apt-get install dataset-fashion-mnist"
)


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


@pytest.fixture
def tiny_config(tmp_path):
    """`tiny_config(*overrides, run_dir=...)` -> the resolved RunConfig of a tiny lab run."""

    def make(*extra: str, run_dir: str | Path | None = None) -> RunConfig:
        return load_config(None, tiny_overrides(run_dir or tmp_path / "run", *extra))

    return make


def run_cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`python -m clipdistill.cli ARGS` in a fresh process; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "clipdistill.cli", *args], capture_output=True, text=True, **kwargs
    )
