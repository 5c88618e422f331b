"""How well the lab teacher knows the reinforced cache's views: its zero-shot top-1 on the validation
split, plain and under the views' crop and flip, and the cosine of those embeddings to the plain ones.

    python benchmarks/teacher_on_views.py [--run-dir runs/bench] [--min-scale 0.5]
        [--out benchmarks/results/teacher_on_views.json]

Needs a run dir with the lab teacher (`teacher/model.safetensors`). Each validation image gets view 1
of `view_params` (seed 0): a crop of area min-scale..1, flipped or not; "crop" drops the flip, "flip"
mirrors the whole image.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from clipdistill.checkpoint import write_json  # noqa: E402
from clipdistill.config import load_config  # noqa: E402
from clipdistill.data.lab import load_lab, to_pixels  # noqa: E402
from clipdistill.data.views import IDENTITY, apply_views, view_params  # noqa: E402
from clipdistill.evaluate.zeroshot import zeroshot_accuracy  # noqa: E402
from clipdistill.lab import LAB_CONFIG  # noqa: E402
from clipdistill.models.classifier import zeroshot_classifier  # noqa: E402
from clipdistill.models.factory import create_teacher  # noqa: E402


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", default="runs/bench")
    parser.add_argument("--min-scale", type=float, default=0.5)
    parser.add_argument("--out", default="benchmarks/results/teacher_on_views.json")
    args = parser.parse_args()
    cfg = load_config(str(LAB_CONFIG), ["--run_dir", args.run_dir])
    lab = load_lab(cfg.data)
    teacher = create_teacher(cfg.teacher, lab_data=True)
    model = teacher.model.eval()

    def encode_text(texts: list[str]) -> torch.Tensor:
        return F.normalize(model.encode_text(teacher.tokenizer(texts)).float(), dim=-1)

    classifier = zeroshot_classifier(encode_text, lab.classnames, lab.templates)
    pixels = teacher.preprocess.normalize(to_pixels(lab.val.images, teacher.preprocess.image_size))
    view = torch.from_numpy(view_params(0, np.arange(len(pixels)), 2, args.min_scale)[:, 1])
    no_flip = view.clone()
    no_flip[:, 4] = 0
    flip = torch.tensor([*IDENTITY[:4], 1.0]).repeat(len(pixels), 1)
    results, plain = {}, None
    for name, params in (("plain", None), ("crop_and_flip", view), ("crop", no_flip), ("flip", flip)):
        images = pixels if params is None else apply_views(pixels, params)
        feats = torch.cat([F.normalize(model.encode_image(b).float(), dim=-1) for b in images.split(500)])
        plain = feats if plain is None else plain
        results[name] = {
            "zeroshot_top1": zeroshot_accuracy(feats, lab.val.labels, classifier)["acc1"],
            "cosine_to_plain": float((feats * plain).sum(dim=1).mean()),
        }
        print(name, {k: round(v, 3) for k, v in results[name].items()}, flush=True)
    write_json(Path(args.out), {"min_scale": args.min_scale, "split": "val", "results": results})


if __name__ == "__main__":
    main()
