"""Kill soak: SIGKILL every stage at random points, rerun it, and compare with an uninterrupted run.

    python benchmarks/kill_soak.py [--n 5] [--seed 0] [--stages embed,balance,cluster,train] [--keep DIR]

On the tiny lab config (Fashion-MNIST from Debian's dataset-fashion-mnist, CPU). Each stage is first run
uninterrupted (its wall time gives the window kills are drawn from), then N times: start it in a fresh
run folder (with a copy of the reference cache where the stage reads one), SIGKILL it at a uniform random
time after interpreter start-up, rerun it to completion, and compare its outputs byte for byte:
embed the cache files (report.json aside: it holds timings), balance and cluster their folders, train
model.safetensors (deterministic mode). Prints one summary line per stage; exit 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses: bit-identical numbers, no thread contention

STAGES = ("embed", "balance", "cluster", "train")


def stage_args(run_dir: Path, teacher: Path) -> list[str]:
    return [
        "--run_dir", str(run_dir),
        "--teacher.name", "lab-student-tiny", "--teacher.pretrained", str(teacher),
        "--teacher.lock_text", "false", "--student.name", "lab-student-tiny",
        "--data.train_size", "1024", "--data.val_size", "64",
        "--embed.batch_size", "64", "--embed.shard_size", "64", "--embed.device", "cpu",
        "--balance.n_clusters", "8", "--balance.tau_p", "0.99995", "--cluster.n_clusters", "8",
        "--train.method", "clip", "--train.batch_size", "32", "--train.steps", "24",
        "--train.warmup_steps", "2", "--train.log_every", "1", "--train.ckpt_every", "1",
        "--train.deterministic", "true", "--train.device", "cpu",
    ]  # fmt: skip


def outputs(run_dir: Path, stage: str) -> dict[str, bytes]:
    """The stage's final outputs (temporary files excluded: they are counted apart)."""
    if stage == "train":
        files = [run_dir / "clip" / "model.safetensors"]
    else:
        folder = run_dir / ("cache" if stage == "embed" else stage)
        files = [p for p in sorted(folder.glob("*")) if p.name != "report.json" or stage != "embed"]
    return {p.name: p.read_bytes() for p in files if p.is_file() and not p.name.endswith(".tmp")}


def leftover_tmp(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*.tmp")]


def cli(stage: str, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "clipdistill.cli", stage, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_to_end(stage: str, args: list[str]) -> float:
    start = time.time()
    proc = cli(stage, args)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed ({proc.returncode}):\n{err}")
    return time.time() - start


def prepare(run_dir: Path, stage: str, reference: Path) -> None:
    run_dir.mkdir(parents=True)
    if stage != "embed":
        shutil.copytree(reference / "cache", run_dir / "cache")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=5, help="kills per stage (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--keep", help="work folder to keep (default: a temporary one, removed)")
    opts = parser.parse_args()
    stages = [s for s in opts.stages.split(",") if s]
    rng = random.Random(opts.seed)
    work = Path(opts.keep or tempfile.mkdtemp(prefix="kill_soak_"))
    work.mkdir(parents=True, exist_ok=True)

    import torch

    from clipdistill.checkpoint import save_state_dict
    from clipdistill.config import ModelConfig
    from clipdistill.models.factory import create_model

    torch.manual_seed(0)  # a fixed stand-in teacher, so that every embed run sees the same weights
    teacher = work / "teacher.safetensors"
    save_state_dict(create_model(ModelConfig(name="lab-student-tiny")).model.state_dict(), teacher)

    start = time.time()
    subprocess.run([sys.executable, "-c", "import clipdistill.cli, torch"], check=True)
    startup = time.time() - start  # kills before this land in imports, where nothing is written yet

    reference = work / "reference"
    durations = {}
    for stage in STAGES:  # the whole pipeline once, uninterrupted (later stages read the cache)
        if stage in stages or stage == "embed":
            durations[stage] = run_to_end(stage, stage_args(reference, teacher))
    failed = False
    total_kills = 0
    for stage in stages:
        expected = outputs(reference, stage)
        same = mid_run = tmp_files = 0
        low = min(startup, durations[stage] / 2)
        for i in range(opts.n):
            run_dir = work / f"{stage}_{i}"
            prepare(run_dir, stage, reference)
            args = stage_args(run_dir, teacher)
            delay = rng.uniform(low, durations[stage])
            proc = cli(stage, args)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            mid_run += proc.returncode == -signal.SIGKILL
            total_kills += 1
            run_to_end(stage, args)
            got = outputs(run_dir, stage)
            tmp_files += len(leftover_tmp(run_dir))
            if got == expected:
                same += 1
            else:
                failed = True
                differ = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
                print(f"  {stage} run {i} (killed at {delay:.2f}s): differs in {differ}")
            if not opts.keep:
                shutil.rmtree(run_dir)
        print(
            f"{stage:8s} {opts.n} kills ({mid_run} mid-run) in [{low:.1f}, {durations[stage]:.1f}] s: "
            f"{same}/{opts.n} reruns identical to the uninterrupted run, {tmp_files} temporary files left"
        )
    print(f"total: {total_kills} kills, {'FAILED' if failed else 'all identical'}")
    if not opts.keep:
        shutil.rmtree(work)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
