"""Kill soak: SIGKILL every stage at random points, rerun it, and compare with an uninterrupted run.

    python benchmarks/kill_soak.py [--n 5] [--seed 0] [--stages embed,balance,cluster,train,eval,export]
                                   [--keep DIR]

On the tiny lab config (Fashion-MNIST from Debian's dataset-fashion-mnist, CPU). Each stage is first run
uninterrupted (its wall time gives the window kills are drawn from; a later run that ends sooner, on a
less loaded machine, shrinks it), then until N runs were killed mid-run (at most 3N runs; one that ends
before its kill time is a run, not a kill): start it in a fresh run folder (with a copy of the
reference cache, and for eval and export of the reference's trained model), SIGKILL it at a uniform
random time after interpreter start-up, check that every output already under its final name is whole
(equal to the uninterrupted run's), rerun it to completion, and compare its outputs byte for byte:
embed the cache files (report.json aside: it holds timings), balance and cluster their folders, train
model.safetensors (deterministic mode), eval eval.json and eval.csv (eval_seconds aside), export every
file of export/ (open_clip and ONNX). Prints one summary line per stage; exit 1 on any mismatch or a
stage short of N kills.
"""

from __future__ import annotations

import argparse
import json
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

STAGES = ("embed", "balance", "cluster", "train", "eval", "export")


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
        "--eval.device", "cpu", "--eval.model", "clip", "--eval.linear_probe_train", "1024",
        "--eval.retrieval_size", "256", "--export.model", "clip",
    ]  # fmt: skip


def outputs(run_dir: Path, stage: str) -> dict[str, bytes]:
    """The stage's final outputs (temporary files excluded: they are counted apart)."""
    if stage == "train":
        files = [run_dir / "clip" / "model.safetensors"]
    elif stage == "eval":
        return eval_outputs(run_dir / "clip")
    elif stage == "export":
        files = sorted(p for p in (run_dir / "clip" / "export").rglob("*") if p.is_file())
        return {str(p.relative_to(run_dir)): p.read_bytes() for p in files if not p.name.endswith(".tmp")}
    else:
        folder = run_dir / ("cache" if stage == "embed" else stage)
        files = [p for p in sorted(folder.glob("*")) if p.name != "report.json" or stage != "embed"]
    return {p.name: p.read_bytes() for p in files if p.is_file() and not p.name.endswith(".tmp")}


def eval_outputs(folder: Path) -> dict[str, bytes]:
    """eval.json and eval.csv without eval_seconds (a timing; the last column of the csv)."""
    out = {}
    if (folder / "eval.json").is_file():
        metrics = json.loads((folder / "eval.json").read_text())
        metrics.pop("eval_seconds")
        out["eval.json"] = json.dumps(metrics, sort_keys=True).encode()
    if (folder / "eval.csv").is_file():
        lines = (folder / "eval.csv").read_bytes().splitlines()
        out["eval.csv"] = b"\n".join(line.rsplit(b",", 1)[0] for line in lines)
    return out


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
    if stage in ("eval", "export"):  # the trained model, without what eval and export wrote next to it
        shutil.copytree(
            reference / "clip", run_dir / "clip", ignore=shutil.ignore_patterns("eval.*", "export")
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--n", type=int, default=5, help="kills mid-run per stage (default 5; at most 3N runs)"
    )
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
    needed = set(stages) | {"embed"} | ({"train"} if {"eval", "export"} & set(stages) else set())
    for stage in STAGES:  # the pipeline once, uninterrupted (later stages read the cache and the model)
        if stage in needed:
            durations[stage] = run_to_end(stage, stage_args(reference, teacher))
    failed = False
    total_kills = 0
    for stage in stages:
        expected = outputs(reference, stage)
        same = mid_run = tmp_files = left = broken = i = 0
        window = durations[stage]
        while mid_run < opts.n and i < 3 * opts.n:  # a run that ends before its kill time is not a kill
            run_dir = work / f"{stage}_{i}"
            prepare(run_dir, stage, reference)
            args = stage_args(run_dir, teacher)
            low = min(startup, window / 2)
            delay = rng.uniform(low, window)
            start = time.time()
            proc = cli(stage, args)
            try:
                proc.wait(timeout=delay)
                window = time.time() - start  # it ran faster than the window (less load): shrink it
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            mid_run += proc.returncode == -signal.SIGKILL
            for name, data in outputs(run_dir, stage).items():  # left by the kill under a final name
                left += 1
                if data != expected.get(name):
                    broken += 1
                    failed = True
                    print(f"  {stage} run {i} (killed at {delay:.2f}s): partial {name} under its final name")
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
            i += 1
        failed |= mid_run < opts.n
        total_kills += mid_run
        print(
            f"{stage:8s} {mid_run} kills mid-run ({i} runs) within {durations[stage]:.1f} s: "
            f"{left} outputs left under final names by the kills, {broken} of them partial; "
            f"{same}/{i} reruns identical to the uninterrupted run, {tmp_files} temporary files left"
        )
    print(f"total: {total_kills} kills mid-run, {'FAILED' if failed else 'all identical'}")
    if not opts.keep:
        shutil.rmtree(work)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
