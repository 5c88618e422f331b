"""The linear probe's L-BFGS budget: each C of its sweep fitted with 100 and with 300 iterations on a
lab model's features, scored on the validation split, with the seconds each fit took.

    python benchmarks/probe_iterations.py [--run-dir runs/bench] [--model teacher]
        [--out benchmarks/results/probe_iterations.json]

Needs a run dir with the model (`<model>/model.safetensors`). Features as `eval` computes them: the
probe's 10,000 train images and the 5,000 validation images.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from clipdistill.checkpoint import write_json  # noqa: E402
from clipdistill.config import load_config  # noqa: E402
from clipdistill.data.lab import load_lab  # noqa: E402
from clipdistill.evaluate.linear_probe import fit_and_score  # noqa: E402
from clipdistill.evaluate.run import image_features  # noqa: E402
from clipdistill.lab import LAB_CONFIG  # noqa: E402
from clipdistill.models.classifier import TrainedClassifier  # noqa: E402

COSTS = (0.01, 0.1, 1.0, 10.0, 100.0)  # linear_probe's sweep
ITERATIONS = (100, 300)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", default="runs/bench")
    parser.add_argument("--model", default="teacher")
    parser.add_argument("--out", default="benchmarks/results/probe_iterations.json")
    args = parser.parse_args()
    cfg = load_config(str(LAB_CONFIG), ["--run_dir", args.run_dir])
    lab = load_lab(cfg.data)
    loaded = TrainedClassifier(cfg, args.model).loaded
    device = torch.device("cpu")
    train = image_features(
        loaded, lab.train, cfg.eval.batch_size, device, cfg.eval.linear_probe_train
    ).numpy()
    val = image_features(loaded, lab.val, cfg.eval.batch_size, device).numpy()
    train_y, val_y = lab.train.labels[: len(train)].numpy(), lab.val.labels.numpy()
    results = []
    for c in COSTS:
        for iterations in ITERATIONS:
            start = time.time()
            accuracy = fit_and_score(train, train_y, val, val_y, c, iterations, seed=0)
            results.append(
                {"c": c, "iterations": iterations, "val_acc1": accuracy, "seconds": time.time() - start}
            )
            print(results[-1], flush=True)
    write_json(Path(args.out), {"model": args.model, "run_dir": args.run_dir, "results": results})


if __name__ == "__main__":
    main()
