"""A user's own data and teacher, made inside a test: coloured-shape PNGs per class in a table, a tiny
open_clip model that is not one of the shipped configs, and a Hugging Face cache folder holding it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from clipdistill.checkpoint import save_state_dict
from clipdistill.models.factory import CONFIG_DIR, build_model

CLASSES = {"red circle": (220, 30, 30), "green square": (30, 200, 40), "blue triangle": (40, 60, 220)}
REVISION = "0123456789abcdef0123456789abcdef01234567"


def draw_shape(name: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One class's shape, in its colour, at a random place and size on a grey background."""
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(90, 140, 3)))
    draw = ImageDraw.Draw(image)
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    colour = tuple(int(np.clip(c + rng.integers(-20, 20), 0, 255)) for c in CLASSES[name])
    box = (cx - r, cy - r, cx + r, cy + r)
    if "circle" in name:
        draw.ellipse(box, fill=colour)
    elif "square" in name:
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image


def write_table(folder: Path, per_class: int = 20, seed: int = 0, split: bool = False) -> Path:
    """`folder/images/<class>/<i>.png` and `folder/pairs.csv` (filepath relative to the table, title,
    label as the class name, optionally a train/test `split` column)."""
    rng = np.random.default_rng(seed)
    rows = []
    for name in CLASSES:
        (folder / "images" / name.replace(" ", "_")).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            relative = f"images/{name.replace(' ', '_')}/{i:03d}.png"
            draw_shape(name, rng).save(folder / relative)
            row = {"filepath": relative, "title": f"a {['small', 'big'][i % 2]} {name} #{i}", "label": name}
            if split:
                row["split"] = "test" if i % 4 == 0 else "train"
            rows.append(row)
    table = folder / "pairs.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "classes.txt").write_text("".join(f"{name}\n" for name in CLASSES))
    return table


def tiny_model_config(embed_dim: int = 24) -> dict:
    """An open_clip model config that is none of the shipped ones (so nothing treats it as the lab's)."""
    config = json.loads((CONFIG_DIR / "lab-student-tiny.json").read_text())
    config["embed_dim"] = embed_dim
    return config


def tiny_model(seed: int = 7, embed_dim: int = 24) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_model_config(embed_dim)).eval()


def open_clip_folder(folder: Path, model: torch.nn.Module, config: dict, weights: str | None) -> Path:
    """open_clip's model folder layout: open_clip_config.json + the weights file named `weights`."""
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = {k: v for k, v in config.items() if k != "preprocess_cfg"}
    pre = config["preprocess_cfg"]
    spec = {"model_cfg": model_cfg, "preprocess_cfg": {"size": 32, "mean": pre["mean"], "std": pre["std"]}}
    (folder / "open_clip_config.json").write_text(json.dumps(spec))
    if weights is not None:
        state = model.state_dict()
        if weights.endswith(".safetensors"):
            save_state_dict(state, folder / weights)
        else:
            torch.save(state, folder / weights)
    return folder


def hf_cache(root: Path, repo: str, model: torch.nn.Module, config: dict, weights: str | None) -> Path:
    """A Hugging Face hub cache (`HF_HUB_CACHE`) holding `repo` as the hub lays it out:
    models--ORG--NAME/snapshots/<revision>/ with the files and refs/main naming the revision."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    open_clip_folder(repo_dir / "snapshots" / REVISION, model, config, weights)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(REVISION)
    return root
