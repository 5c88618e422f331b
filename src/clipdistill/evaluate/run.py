"""The `eval` stage: zero-shot, linear probe and retrieval of a trained model on the lab's test split
(or on your own labelled images: `evaluate/own_data.py`)."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipdistill.checkpoint import atomic_write, save_npy, write_json
from clipdistill.config import ConfigError, RunConfig, fingerprint, to_dict
from clipdistill.data.lab import LabSplit, load_lab, to_pixels
from clipdistill.data.shifts import DOMAIN_SHIFTS
from clipdistill.data.splits import base_novel_split
from clipdistill.distributed import resolve_device
from clipdistill.evaluate.linear_probe import linear_probe
from clipdistill.evaluate.own_data import evaluate_own_data, markdown
from clipdistill.evaluate.protocols import base_to_novel, domain_shift
from clipdistill.evaluate.retrieval import retrieval_recall
from clipdistill.evaluate.zeroshot import predict_with_classifier, zeroshot_accuracy
from clipdistill.models.classifier import TrainedClassifier
from clipdistill.models.factory import LoadedModel
from clipdistill.runs import model_dir, model_name, sweep_temps

OWN_DATA_KINDS = ("csv", "folder")


@torch.no_grad()
def image_features(
    loaded: LoadedModel,
    split: LabSplit,
    batch_size: int,
    device: torch.device,
    limit: int = 0,
    desc: str = "features",
    shift=None,
) -> torch.Tensor:
    """L2-normalised image features; `shift` transforms the [0, 1] pixels first (domain shift)."""
    n = min(limit, len(split)) if limit else len(split)
    feats = []
    for start in tqdm(range(0, n, batch_size), desc=desc, leave=False, dynamic_ncols=True):
        pixels = to_pixels(split.images[start : min(start + batch_size, n)], loaded.preprocess.image_size)
        pixels = shift(pixels) if shift is not None else pixels
        x = loaded.preprocess.normalize(pixels).to(device)
        feats.append(F.normalize(loaded.model.encode_image(x).float(), dim=-1).cpu())
    return torch.cat(feats)


@torch.no_grad()
def text_features(loaded: LoadedModel, texts: list[str], device: torch.device, batch_size: int = 512):
    out = [
        loaded.model.encode_text(loaded.tokenizer(texts[i : i + batch_size]).to(device)).float().cpu()
        for i in range(0, len(texts), batch_size)
    ]
    return F.normalize(torch.cat(out), dim=-1)


def teacher_feature_memo(cfg: RunConfig, visual: torch.nn.Module) -> Path:
    """Where a frozen teacher image tower's eval features are kept, keyed by its weights: the teacher
    and every prompt-tuned teacher without visual prompts share one tower, so its features are
    computed once per run dir instead of once per evaluation."""
    digest = hashlib.sha256(fingerprint(to_dict(cfg.data)).encode())  # the splits depend on the data
    for key, tensor in sorted(visual.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return Path(cfg.run_dir) / "eval_features" / digest.hexdigest()[:16]


def evaluate_model(cfg: RunConfig, name: str) -> dict:
    """Metrics (percent) of model `name` on the lab, in the results schema's names."""
    if cfg.data.kind != "lab":
        raise ConfigError(
            "eval runs on the lab data (data.kind lab), your own labelled images (data.kind csv with "
            "data.label_key, or folder) or a paper suite (--suite)"
        )
    device = resolve_device(cfg.eval.device)
    start = time.time()
    scorer = TrainedClassifier(cfg, name, device)
    loaded = scorer.loaded
    lab = load_lab(cfg.data)
    ec = cfg.eval
    memo = teacher_feature_memo(cfg, loaded.model.visual) if name == "teacher" else None
    if scorer.kind == "text_bank" and not scorer.visual_prompts:  # the frozen teacher's tower
        memo = teacher_feature_memo(cfg, loaded.model.visual)
    classifier, _ = scorer.weights(lab.classnames, lab.templates)
    class_features = scorer.class_features

    # a lab target domain is scored on its own images, and under the other shifts of the clean images
    clean = load_lab(dataclasses.replace(cfg.data, domain="")) if cfg.data.domain else lab
    shift_names = {shift: shift_name for shift_name, shift in DOMAIN_SHIFTS.items()}

    def features(split: str, limit: int = 0, shift=None) -> torch.Tensor:
        source = lab if shift is None else clean
        shift_name = shift_names.get(shift, "none") + ("_clean" if source is not lab else "")
        path = memo / f"{split}_{limit}_{shift_name}_{ec.batch_size}.npy" if memo is not None else None
        if path is not None and path.is_file():
            return torch.from_numpy(np.load(path, allow_pickle=False))
        desc = split if shift is None else f"{split} {shift_name}"
        feats = image_features(loaded, getattr(source, split), ec.batch_size, device, limit, desc, shift)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_npy(path, feats.numpy())
        return feats

    # `eval.split val` scores the validation images instead of the test ones: what settings are chosen
    # on. The linear probe chooses its C on them and retrieval reads test captions: test only.
    scored = getattr(lab, ec.split)
    test = features(ec.split)
    zs = zeroshot_accuracy(class_features(test), scored.labels, classifier)
    metrics = {
        # a ComKD student deploys its image tower and head only (no text tower)
        "params": scorer.params,
        "zeroshot_top1": zs["acc1"],
        "zeroshot_top5": zs["acc5"],
    }
    if ec.split == "test" and ec.linear_probe:
        train = features("train", ec.linear_probe_train)
        val = features("val")
        probe = linear_probe(
            train, lab.train.labels[: len(train)], val, lab.val.labels, test, lab.test.labels
        )
        metrics |= {"linear_probe_top1": probe["acc1"], "linear_probe_c": probe["best_c"]}
    if scorer.has_text_tower and ec.split == "test":  # retrieval needs one
        k = ec.retrieval_size
        retrieval = retrieval_recall(
            test[:k],
            text_features(loaded, lab.test.captions[:k], device),
            image_labels=lab.test.labels[:k],
            text_labels=lab.test.labels[:k],
        )
        metrics |= {
            "retrieval_i2t_r1": retrieval["text_retrieval_recall@1"],
            "retrieval_t2i_r1": retrieval["image_retrieval_recall@1"],
            "retrieval_i2t_r5": retrieval["text_retrieval_recall@5"],
            "retrieval_t2i_r5": retrieval["image_retrieval_recall@5"],
            "retrieval_rule": retrieval["rule"],
        }
    if ec.protocol in ("base_to_novel", "all"):
        base, novel = base_novel_split(len(lab.classnames), cfg.comkd.base_fraction, cfg.comkd.split_seed)
        logits = predict_with_classifier(class_features(test), classifier)
        metrics |= base_to_novel(logits, scored.labels, base, novel)
    if ec.protocol in ("domain", "all"):

        def shifted_logits(shift) -> torch.Tensor:
            feats = features(ec.split, shift=shift)
            return predict_with_classifier(class_features(feats), classifier)

        metrics |= domain_shift(shifted_logits, scored.labels, skip=cfg.data.domain)
    return metrics | {"eval_seconds": round(time.time() - start, 2)}


def eval_stem(cfg: RunConfig) -> str:
    """The name of an evaluation's files in the model folder, after what it scored, so that one model's
    evaluations on other data never overwrite each other: `eval` (the lab's test split), `eval_val`
    (its validation split), `eval_low_contrast` (a lab target domain), `eval_<table or folder name>`
    (your own labelled images; `_val` after it for their validation split). Two tables of one file name
    share a name."""
    data = Path(cfg.data.path).resolve().stem if cfg.data.kind in OWN_DATA_KINDS else cfg.data.domain
    parts = ["eval", data, "" if cfg.eval.split == "test" else cfg.eval.split]
    return "_".join(part for part in parts if part)


def run_eval(cfg: RunConfig) -> dict:
    """Evaluate `cfg.eval.model` (on the lab, or on your own labelled images for data.kind csv or
    folder) and write `<stem>.json`, `.csv` and `.md` into its folder (`eval_stem`)."""
    name = model_name(cfg, cfg.eval.model)
    folder = model_dir(cfg, name)
    if cfg.data.kind in OWN_DATA_KINDS:
        start = time.time()
        metrics = evaluate_own_data(cfg, name, resolve_device(cfg.eval.device))
        metrics["eval_seconds"] = round(time.time() - start, 2)
        where = cfg.data.path if cfg.eval.split == "test" else f"{cfg.data.path} ({cfg.eval.split} split)"
    else:
        metrics = evaluate_model(cfg, name)
        where = f"the {cfg.data.kind} {cfg.eval.split} split"
    if metrics.get("note"):
        print(f"clipdistill eval: note: {metrics['note']}", file=sys.stderr)
    # only now, so that a refused eval leaves the previous results and creates no folder
    folder.mkdir(parents=True, exist_ok=True)
    stem = eval_stem(cfg)
    (folder / f"{stem}.json").unlink(missing_ok=True)  # the done mark: never paired with a newer csv
    sweep_temps(folder, f".{stem}.*.tmp")  # half-written files of a killed eval
    atomic_write(folder / f"{stem}.csv", lambda tmp: _write_csv(tmp, {"model": name, **metrics}))
    table = markdown(name, where, metrics)
    atomic_write(folder / f"{stem}.md", lambda tmp: tmp.write_text(table))
    write_json(folder / f"{stem}.json", metrics)  # last: written only once everything else is
    return metrics


def _write_csv(path: Path, row: dict) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
