"""The real pipeline at a real shape, on CPU: 512-px JPEG WebDataset shards, open_clip models at 224 px.

    python -m benchmarks.real        # or: make bench-real

Builds a corpus of photo-like 512-px JPEGs (random crops, flips and colour shifts of scikit-learn's
two sample photos) with captions in WebDataset shards, saves a ViT-B/32-shaped teacher
(open_clip `ViT-B-32`) with random weights to a file (the teacher of the run, passed as
--teacher.pretrained), and runs embed -> balance -> cluster -> train cid -> eval -> export with a
small ViT student at 224 px, each stage as its own `clipdistill`
process with one thread (OMP_NUM_THREADS=1: figures per core, which the load of a shared machine
changes less). It records each stage's wall seconds, images/s and peak RSS, and the step-time ratio
of cached-KD training (`cid`, reading the teacher cache) to plain CLIP training (`clip`). The
numbers are of random weights: they measure cost, not accuracy.
Results: benchmarks/results/real.json and real.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageEnhance

from clipdistill.data.lab import CLASSNAMES

STUDENT = {  # a small ViT at 224 px with open_clip's default text tower shape, narrower
    "embed_dim": 256,
    "vision_cfg": {"image_size": 224, "patch_size": 32, "width": 256, "layers": 4, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}


def photo_jpegs(count: int, side: int = 512, seed: int = 0) -> list[bytes]:
    """`count` distinct photo-like JPEGs of side x side px (quality 90)."""
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(x) for x in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        crop = int(rng.integers(200, min(photo.size)))
        x, y = int(rng.integers(0, photo.width - crop)), int(rng.integers(0, photo.height - crop))
        image = photo.crop((x, y, x + crop, y + crop)).resize((side, side), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image = ImageEnhance.Color(image).enhance(float(rng.uniform(0.5, 1.5)))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def write_shards(folder: Path, count: int, per_shard: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    shards = -(-count // per_shard)
    urls = str(folder / f"shard-{{000..{shards - 1:03d}}}.tar")
    if (folder / f"shard-{shards - 1:03d}.tar").is_file():
        return urls
    for s, start in enumerate(range(0, count, per_shard)):
        images = photo_jpegs(min(per_shard, count - start), seed=s)
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            for i, data in enumerate(images):
                key = f"{start + i:06d}"
                caption = f"a photo of a {CLASSNAMES[(start + i) % len(CLASSNAMES)]}.".encode()
                for name, blob in ((f"{key}.jpg", data), (f"{key}.txt", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    return urls


def save_random_teacher(path: Path) -> None:
    """open_clip ViT-B-32 with its random initialisation (seed 0), as a safetensors file."""
    if path.is_file():
        return
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def run_stage(config: Path, stage: str, *args: str) -> dict:
    """One `clipdistill` stage in its own process: wall seconds and peak RSS (MiB)."""
    command = [sys.executable, "-m", "clipdistill.cli", stage, "--config", str(config), *args]
    start = time.perf_counter()
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"{stage} failed: {proc.stderr.read()[-3000:]}")
    proc.stderr.close()
    return {"seconds": round(seconds, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def step_seconds(run: Path, name: str, skip: int) -> dict[str, float]:
    """Seconds per step after the first `skip` steps (from metrics.jsonl's elapsed times): the fastest
    step, which other jobs on a shared machine disturbed least, and the median."""
    records = [json.loads(line) for line in (run / name / "metrics.jsonl").read_text().splitlines()]
    steps = np.diff([r["elapsed"] for r in records][skip:])
    return {"fastest": round(float(steps.min()), 3), "median": round(float(np.median(steps)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/real")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/real.json")
    args = parser.parse_args()
    work = Path(args.workdir).resolve()
    run = work / "run"
    urls = write_shards(work / "shards", args.images, per_shard=128)
    save_random_teacher(work / "vit-b-32-random.safetensors")
    (work / "student.json").write_text(json.dumps(STUDENT))
    settings = {
        "run_dir": str(run),
        "data": {"kind": "webdataset", "path": urls, "num_workers": 0},
        "teacher": {"name": "ViT-B-32", "pretrained": str(work / "vit-b-32-random.safetensors")},
        "student": {"name": str(work / "student.json")},
        "embed": {"batch_size": 32, "shard_size": 128, "device": "cpu"},
        "balance": {"n_clusters": 8},
        "cluster": {"n_clusters": 16},
        "cid": {"clusters": "cluster"},
        "train": {
            "steps": args.steps,
            "batch_size": args.batch,
            "lr": 1e-4,
            "warmup_steps": 2,
            "log_every": 1,
            "ckpt_every": 1000,
            "device": "cpu",
        },  # fmt: skip
        "eval": {"device": "cpu", "batch_size": 128, "linear_probe_train": 1000, "retrieval_size": 500},
    }
    config = work / "real.yaml"
    config.write_text(yaml.safe_dump(settings, sort_keys=False))

    n = args.images
    trained = args.steps * args.batch
    stages = {}
    stages["embed"] = run_stage(config, "embed") | {"images": n}
    stages["balance"] = run_stage(config, "balance") | {"images": n}
    stages["cluster"] = run_stage(config, "cluster") | {"images": n}
    # on every row: the random teacher's embeddings are near-duplicates, so balance keeps very few
    cid = ("--train.method", "cid", "--train.name", "cid")
    stages["train cid"] = run_stage(config, "train", *cid) | {"images": trained}
    stages["train clip"] = run_stage(config, "train", "--train.method", "clip", "--train.name", "clip") | {
        "images": trained
    }
    # eval's datasets are the lab's (Fashion-MNIST, upscaled to 224 px)
    stages["eval"] = run_stage(config, "eval", "--eval.model", "cid", "--data.kind", "lab", "--data.path", "")
    stages["eval"]["images"] = 10000 + 1000  # the lab's test split, the probe's train images
    stages["export"] = run_stage(config, "export", "--export.model", "cid")
    for row in stages.values():
        if "images" in row:
            row["images_per_s"] = round(row["images"] / row["seconds"], 1)
    skip = 2  # the first steps pay for warm-up (allocations, first reads)
    kd, plain = step_seconds(run, "cid", skip), step_seconds(run, "clip", skip)
    report = {
        "command": f"python -m benchmarks.real --images {n} --steps {args.steps} --batch {args.batch}",
        "corpus": f"{n} 512-px JPEGs in {-(-n // 128)} WebDataset shards",
        "teacher": "open_clip ViT-B-32 (random weights from a file), 224 px",
        "student": f"ViT 4 layers x 256 wide, patch 32, 224 px; text 4 layers x 256 ({json.dumps(STUDENT)})",
        "stages": stages,
        "step_seconds": {"cid (cached KD)": kd, "clip (plain)": plain},
        "kd_step_ratio": round(kd["fastest"] / plain["fastest"], 3),
        "kd_step_ratio_median": round(kd["median"] / plain["median"], 3),
        "cpu": f"one thread per stage process; {len(os.sched_getaffinity(0))} cores on the machine",
        "note": "wall seconds of each stage's whole process (imports and model loading included)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| stage | seconds | images | images/s | peak RSS (MiB) |", "|---|---|---|---|---|"]
    for name, row in stages.items():
        lines.append(
            f"| {name} | {row['seconds']} | {row.get('images', '')} | {row.get('images_per_s', '')} "
            f"| {row['peak_rss_mib']} |"
        )
    lines.append("")
    for key in ("fastest", "median"):
        ratio = kd[key] / plain[key]
        lines.append(
            f"cached-KD step / plain step at 224 px, {key}: {kd[key]} s / {plain[key]} s = {ratio:.2f}  "
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
