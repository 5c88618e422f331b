"""`clipdistill eval --suite NAME`: one trained model over every dataset of a paper suite, one table.

Rows follow the papers' order (`data.paper.SUITES`) and end with the average, so a table can be set
beside a paper's. `base_to_novel` reports base, novel and HM per dataset (CoOp's protocol: the first
half of the classes is base, each half scored among its own classes, HM of the averages in the last
row as the papers print it); `linear_probe` the top-1 of a logistic regression on frozen features; the
other suites zero-shot top-1, averaged over the target datasets (ImageNet, the source, is left out of
cross-dataset and domain-generalisation averages, as in the papers). Every dataset is opened before
any model runs, so a missing folder costs nothing and all of them are named at once.

`eval.model` may hold `{dataset}` (e.g. `{dataset}/comkd`): ComKD students are trained per dataset
and carry only that dataset's text bank, so each dataset is scored by its own model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clipdistill.checkpoint import atomic_write, write_json
from clipdistill.config import ConfigError, RunConfig
from clipdistill.data import paper
from clipdistill.data.classification import collate_labeled
from clipdistill.data.sources import pil_transform
from clipdistill.distributed import resolve_device
from clipdistill.evaluate.linear_probe import linear_probe
from clipdistill.evaluate.protocols import harmonic_mean
from clipdistill.evaluate.zeroshot import zeroshot_accuracy
from clipdistill.models.classifier import TrainedClassifier
from clipdistill.runs import model_dir, model_name, sweep_temps

METRICS = {"base_to_novel": ("base_acc", "novel_acc", "hm"), "linear_probe": ("linear_probe_top1",)}
DEFAULT_METRICS = ("top1",)
COLUMN_TITLES = {
    "base_acc": "Base",
    "novel_acc": "Novel",
    "hm": "HM",
    "linear_probe_top1": "Top-1",
    "top1": "Top-1",
}
SOURCE_DATASETS = {"cross_dataset": ("imagenet",), "domain_generalization": ("imagenet",)}  # not averaged


class DeferredTransform:
    """A transform chosen after the datasets are opened: the model (and its input size) loads later."""

    def __init__(self) -> None:
        self.transform: Callable | None = None

    def __call__(self, image):
        return self.transform(image)


@dataclass
class Opened:
    """The sets one dataset of the suite needs, opened up front, and their shared transform."""

    name: str
    sets: dict[str, Dataset]  # "test" or "base"/"new" (base_to_novel) or "train"/"val"/"test" (linear probe)
    transform: DeferredTransform


def suite_parts(suite: str) -> dict[str, tuple[str, str]]:
    """Which sets a suite reads: key -> (split, subsample)."""
    if suite == "base_to_novel":
        return {"base": ("test", "base"), "new": ("test", "new")}
    if suite == "linear_probe":
        return {"train": ("train", "all"), "val": ("val", "all"), "test": ("test", "all")}
    return {"test": ("test", "all")}


def open_datasets(suite: str, names: list[str], root: str) -> list[Opened]:
    """Every set of every dataset; the errors of all that cannot be read are raised together."""
    opened, errors = [], []
    for name in names:
        transform = DeferredTransform()
        sets = {}
        for key, (split, subsample) in suite_parts(suite).items():
            try:
                sets[key] = paper.build_dataset(name, root, split, transform, subsample=subsample)
            except (FileNotFoundError, ValueError, OSError) as e:
                errors.append(str(e) if name in str(e) else f"{name}: {e}")
                break
        else:
            opened.append(Opened(name, sets, transform))
    if errors:
        raise ConfigError(
            f"eval suite {suite}: {len(errors)} of {len(names)} datasets cannot be read under "
            f"eval.suite_root {root!r}; nothing was evaluated:\n  " + "\n  ".join(errors)
        )
    return opened


@torch.no_grad()
def dataset_features(
    scorer: TrainedClassifier, dataset: Dataset, batch_size: int, workers: int, desc: str
) -> tuple:
    """(normalised encoder features, labels, skipped images) of a set."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_labeled)
    feats, labels, skipped = [], [], 0
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        skipped += len(batch["skipped"])
        if len(batch["label"]):
            feats.append(scorer.encode_images(batch["image"]))
            labels.append(batch["label"])
    if not feats:
        raise ValueError(f"{desc}: no readable image ({skipped} skipped)")
    return torch.cat(feats), torch.cat(labels), skipped


def score_dataset(
    scorer: TrainedClassifier, suite: str, opened: Opened, cfg: RunConfig, all_names: list[str]
) -> tuple[dict, int]:
    """The suite's metrics (percent) on one dataset, and the images skipped as unreadable."""
    opened.transform.transform = pil_transform(scorer.loaded.preprocess)
    ec, workers = cfg.eval, cfg.data.num_workers
    skipped = 0

    def top1(key: str) -> float:
        nonlocal skipped
        dataset = opened.sets[key]
        feats, labels, bad = dataset_features(scorer, dataset, ec.batch_size, workers, f"{opened.name} {key}")
        skipped += bad
        try:
            classifier, _ = scorer.weights(dataset.classnames, dataset.templates, all_names)
        except ConfigError as e:
            raise ConfigError(
                f"{opened.name}: {e} (use eval.model '{{dataset}}/NAME' for one model per dataset)"
            ) from None
        return zeroshot_accuracy(scorer.class_features(feats), labels, classifier, topk=(1,))["acc1"]

    if suite == "base_to_novel":
        base, novel = top1("base"), top1("new")
        return {"base_acc": base, "novel_acc": novel, "hm": harmonic_mean(base, novel)}, skipped
    if suite == "linear_probe":
        parts = {}
        for key in ("train", "val", "test"):
            feats, labels, bad = dataset_features(
                scorer, opened.sets[key], ec.batch_size, workers, f"{opened.name} {key}"
            )
            parts[key], skipped = (feats.numpy(), labels.numpy()), skipped + bad
        probe = linear_probe(*parts["train"], *parts["val"], *parts["test"])
        return {"linear_probe_top1": probe["acc1"]}, skipped
    return {"top1": top1("test")}, skipped


def average(suite: str, rows: list[dict]) -> dict:
    """The last row: column means over the targets; base_to_novel's HM is that of the mean base and novel."""
    rows = [r for r in rows if r["dataset"] not in SOURCE_DATASETS.get(suite, ())]
    metrics = METRICS.get(suite, DEFAULT_METRICS)
    out = {m: float(np.mean([r[m] for r in rows])) for m in metrics}
    if suite == "base_to_novel":
        out["hm"] = harmonic_mean(out["base_acc"], out["novel_acc"])
    return out


def markdown(suite: str, model: str, rows: list[dict], avg: dict) -> str:
    metrics = METRICS.get(suite, DEFAULT_METRICS)
    lines = [
        f"Suite `{suite}`, model `{model}` (accuracy in percent)",
        "",
        "| Dataset | " + " | ".join(COLUMN_TITLES[m] for m in metrics) + " |",
        "|---|" + "---:|" * len(metrics),
    ]
    lines += [f"| {r['title']} | " + " | ".join(f"{r[m]:.2f}" for m in metrics) + " |" for r in rows]
    lines.append("| **Average** | " + " | ".join(f"**{avg[m]:.2f}**" for m in metrics) + " |")
    sources = [r["title"] for r in rows if r["dataset"] in SOURCE_DATASETS.get(suite, ())]
    if sources:
        lines += ["", f"The average leaves out the source dataset ({', '.join(sources)}), as the papers do."]
    return "\n".join(lines) + "\n"


def run_suite(cfg: RunConfig) -> dict:
    """Evaluate `eval.model` on every dataset of `eval.suite`; write suite_<name>.json and .md."""
    ec = cfg.eval
    if ec.suite not in paper.SUITES:
        raise ConfigError(f"eval.suite must be one of {sorted(paper.SUITES)}, not {ec.suite!r}")
    if not ec.suite_root:
        raise ConfigError("eval.suite needs eval.suite_root: the folder that holds the datasets' folders")
    model = model_name(cfg, ec.model)
    names = list(paper.SUITES[ec.suite])
    per_dataset = "{dataset}" in model
    models = {n: model.replace("{dataset}", n) for n in names}
    missing = [
        str(model_dir(cfg, m) / "model.safetensors")
        for m in dict.fromkeys(models.values())
        if m != "teacher" and not (model_dir(cfg, m) / "model.safetensors").is_file()
    ]
    if missing:
        raise ConfigError(f"eval suite {ec.suite}: no trained model at " + ", ".join(missing))
    folder = Path(cfg.run_dir) if per_dataset else model_dir(cfg, model)
    sweep_temps(folder, f".suite_{ec.suite}.*.tmp")  # half-written files of a killed run
    opened = open_datasets(ec.suite, names, ec.suite_root)
    device = resolve_device(ec.device)
    start, rows, skipped = time.time(), [], 0
    scorer = None
    for item in opened:
        if scorer is None or per_dataset:
            scorer = TrainedClassifier(cfg, models[item.name], device)
        all_names = None
        if scorer.bank is not None and scorer.bank_names is None:  # a bank without names: the full class list
            all_names = paper.build_dataset(item.name, ec.suite_root, "test", None).classnames
        metrics, bad = score_dataset(scorer, ec.suite, item, cfg, all_names)
        skipped += bad
        title = paper.DATASET_TITLES.get(item.name, item.name)
        rows.append({"dataset": item.name, "title": title, "model": models[item.name], **metrics})
    avg = average(ec.suite, rows)
    result = {
        "suite": ec.suite,
        "model": model,
        "rows": rows,
        "average": avg,
        "skipped_images": skipped,
        "eval_seconds": round(time.time() - start, 2),
    }
    folder.mkdir(parents=True, exist_ok=True)
    table = markdown(ec.suite, model, rows, avg)
    atomic_write(folder / f"suite_{ec.suite}.md", lambda tmp: tmp.write_text(table))
    write_json(folder / f"suite_{ec.suite}.json", result)
    return result
