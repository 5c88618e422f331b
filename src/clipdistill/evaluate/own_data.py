"""`clipdistill eval` on your own labelled images: a table (`data.kind csv`: CSV, TSV or Parquet with an
image path column and `data.label_key`) or a folder tree (`data.kind folder`: one sub-folder of images
per class, optionally under `train/` and `test/`).

The same metrics as the lab: zero-shot top-1/top-5 on the test rows, a linear probe fit on the train
rows (its regularisation chosen on val rows), and, when the table has captions, image<->text retrieval
R@1/5/10 with the instance rule (an image's own caption). The rows' split comes from the table's
`data.split_key` column (train/val/test) or a folder's train/test sub-trees; without one it is a seeded
split: half the images test, the rest train and val at 4:1. Image paths in a table are read relative
to the table's folder (or absolute).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clipdistill.config import ConfigError, RunConfig
from clipdistill.data.classification import (
    DEFAULT_TEMPLATES,
    IMAGE_EXTENSIONS,
    check_templates,
    collate_labeled,
    path_hint,
)
from clipdistill.data.images import BadSample, decode_image
from clipdistill.data.sources import pil_transform
from clipdistill.evaluate.linear_probe import linear_probe
from clipdistill.evaluate.retrieval import retrieval_recall
from clipdistill.evaluate.zeroshot import zeroshot_accuracy
from clipdistill.models.classifier import TrainedClassifier

SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
          "dev": "val", "test": "test", "testing": "test"}  # fmt: skip
SPLIT_SEED = 0


@dataclass
class LabelledImages:
    """Image files with a class each, the class names and prompt templates, and each row's split."""

    files: list[Path]
    labels: np.ndarray  # int64 class index per row
    split: np.ndarray  # "train" | "val" | "test" per row
    classnames: list[str]
    templates: list[str]
    captions: list[str] | None  # per row, when the table has a caption column
    where: str  # the table or folder, for messages
    paths: list[str] | None = None  # a table's image paths as written, for the relative-path hint


def read_classnames(path: str) -> tuple[list[str], list[str] | None]:
    """Class names, one per line (blank lines and # comments ignored), or JSON: a list of names or
    `{"classnames": [...], "templates": [...]}` with optional templates (each with `{c}`)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"data.classnames {path} does not exist")
    text = file.read_text(encoding="utf-8")
    templates = None
    if file.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"data.classnames {path} is not valid JSON ({e})") from None
        names = data.get("classnames") if isinstance(data, dict) else data
        if isinstance(data, dict) and data.get("templates") is not None:
            templates = _templates(data["templates"], path)
    else:
        names = [
            line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
        ]
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(f"data.classnames {path}: class names must be a list of non-empty strings")
    if len(names) < 2:
        raise ConfigError(
            f"data.classnames {path} lists {len(names)} class names: a classifier needs at least 2"
        )
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"data.classnames {path}: names appear twice: {duplicates[:5]}")
    return [n.strip() for n in names], templates


def _templates(templates: object, source: str) -> list[str]:
    try:
        return check_templates(templates, source)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def read_labelled(cfg: RunConfig) -> LabelledImages:
    """The labelled images `cfg.data` names (a table or a folder tree), with their split."""
    names, templates = read_classnames(cfg.data.classnames) if cfg.data.classnames else (None, None)
    if cfg.data.kind == "folder":
        data = _read_folder(Path(cfg.data.path), names)
    elif cfg.data.kind == "csv":
        data = _read_table(cfg, names)
    else:
        raise ConfigError(f"own-data eval reads data.kind csv or folder, not {cfg.data.kind!r}")
    data.templates = templates or list(DEFAULT_TEMPLATES)
    return data


def _read_table(cfg: RunConfig, names: list[str] | None) -> LabelledImages:
    d = cfg.data
    path = Path(d.path)
    if not d.label_key:
        raise ConfigError("eval on a table needs --data.label_key COLUMN (each row's class)")
    if not path.is_file():
        raise ConfigError(f"data.path {path} does not exist")
    table = _load_table(path)
    for key, option in ((d.image_key, "data.image_key"), (d.label_key, "data.label_key")):
        if key not in table.columns:
            raise ConfigError(f"{path}: no column {key!r} ({option}); the columns are {list(table.columns)}")
    if table.empty:
        raise ConfigError(f"{path} has no rows")
    raw = table[d.label_key].astype(str).str.strip()
    if names is None:
        if raw.str.fullmatch(r"-?\d+").all():
            raise ConfigError(
                f"{path}: column {d.label_key!r} holds class numbers; name the classes with "
                "--data.classnames FILE (one name per line, in class-number order)"
            )
        names = sorted(set(raw) - {""})
    labels = _label_indices(raw, names, path, d.label_key)
    paths = table[d.image_key].astype(str).tolist()
    files = [path.parent / p for p in paths]  # an absolute path stays itself
    captions = table[d.caption_key].astype(str).tolist() if d.caption_key in table.columns else None
    if d.split_key in table.columns:
        split = _named_split(table[d.split_key].astype(str), path, d.split_key)
    else:
        split = seeded_split(len(table))
    return LabelledImages(files, labels, split, names, [], captions, str(path), paths)


def _load_table(path: Path) -> pd.DataFrame:
    """Every column as text; a TSV by its suffix, Parquet by `.parquet`/`.pq`."""
    if path.suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(path).astype(str)
    sep = "\t" if ".tsv" in [s.lower() for s in path.suffixes] else ","
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"{path} cannot be read as a {'TSV' if sep == chr(9) else 'CSV'} table: {e}"
        ) from None


def _label_indices(raw: pd.Series, names: list[str], path: Path, key: str) -> np.ndarray:
    """Labels as class indices: each a class name, or (all of them) a class number."""
    index = {n: i for i, n in enumerate(names)}
    if raw.isin(index).all():
        return raw.map(index).to_numpy(np.int64)
    if raw.str.fullmatch(r"\d+").all():
        numbers = raw.astype(int).to_numpy(np.int64)
        if numbers.max() < len(names):
            return numbers
        raise ConfigError(
            f"{path}: class numbers in {key!r} go up to {numbers.max()}, but {len(names)} names"
        )
    unknown = sorted(set(raw) - set(index))
    raise ConfigError(
        f"{path}: {len(unknown)} labels in column {key!r} are not among the {len(names)} class names, "
        f"e.g. {unknown[:5]}; the names are {names[:8]}{' ...' if len(names) > 8 else ''}"
    )


def _named_split(values: pd.Series, path: Path, key: str) -> np.ndarray:
    normalised = values.str.strip().str.lower()
    unknown = sorted(set(normalised) - set(SPLITS))
    if unknown:
        raise ConfigError(f"{path}: column {key!r} holds {unknown[:5]}; use train, val and test")
    split = normalised.map(SPLITS).to_numpy(object)
    return _val_from_train(split)


def _val_from_train(split: np.ndarray) -> np.ndarray:
    """Without val rows, a seeded fifth of the train rows chooses the probe's regularisation."""
    split = split.copy()
    if not (split == "val").any():
        train = np.flatnonzero(split == "train")
        picked = np.random.default_rng(SPLIT_SEED).permutation(train)[: len(train) // 5]
        split[picked] = "val"
    return split


def seeded_split(n: int) -> np.ndarray:
    """Half the rows test, the rest train and val at 4:1, by a fixed seed."""
    split = np.full(n, "train", dtype=object)
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    split[order[: n // 2]] = "test"
    return _val_from_train(split)


def _read_folder(root: Path, names: list[str] | None) -> LabelledImages:
    """ROOT/<class>/... (a seeded split), or ROOT/train/<class>/..., ROOT/test/<class>/... and
    optionally ROOT/val/<class>/... (any name in SPLITS)."""
    if not root.is_dir():
        raise ConfigError(f"data.path {root} is not a folder (data.kind folder: one sub-folder per class)")
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    split_folders = [p for p in folders if p.name.lower() in SPLITS]
    trees = {SPLITS[p.name.lower()]: p for p in split_folders}
    split_given = bool(split_folders)
    # a split tree that is not whole would otherwise be read as classes named "train", "val", ...
    whole = {"train", "test"} <= trees.keys() and len(trees) == len(split_folders) == len(folders)
    if split_given and not whole:
        raise ConfigError(
            f"{root}: holds {sorted(p.name for p in folders)[:8]}; a split tree is train/ and test/ "
            "(val/ optional) and nothing else, each with one sub-folder per class; without one, a "
            "sub-folder per class"
        )
    tops = trees if split_given else {"all": root}
    classes = sorted(
        {p.name for top in tops.values() for p in top.iterdir() if p.is_dir() and not p.name.startswith(".")}
    )
    if len(classes) < 2:
        raise ConfigError(
            f"{root}: {len(classes)} class folders; expected one sub-folder of images per class"
        )
    if names is not None and len(names) != len(classes):
        raise ConfigError(
            f"{root}: {len(names)} class names given for {len(classes)} class folders {classes[:8]}"
        )
    # folders named after the listed classes take their label by name; folders that match none of the
    # names (ids like n01440764) take the names in sorted folder order, as torchvision's ImageFolder does
    by_name = {name: i for i, name in enumerate(names or [])}
    named = [by_name.get(c, by_name.get(c.replace("_", " "))) for c in classes]
    unmatched = [c for c, label in zip(classes, named, strict=True) if label is None]
    if names is not None and 0 < len(unmatched) < len(classes):
        raise ConfigError(
            f"{root}: class folders {unmatched[:8]} match no name in data.classnames while "
            f"{len(classes) - len(unmatched)} others do: rename them or fix the names (folders take "
            "their label by name when all match, by sorted order when none does)"
        )
    label_of = named if names is not None and not unmatched else list(range(len(classes)))
    files, labels, split = [], [], []
    for part, top in tops.items():
        for label, folder in zip(label_of, classes, strict=True):
            found = sorted(p for p in (top / folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            files += found
            labels += [label] * len(found)
            split += [part] * len(found)
    if not files:
        raise ConfigError(f"{root}: no images (files ending in {', '.join(IMAGE_EXTENSIONS)})")
    split = _val_from_train(np.array(split, dtype=object)) if split_given else seeded_split(len(files))
    classnames = names or [c.replace("_", " ") for c in classes]
    return LabelledImages(files, np.array(labels, np.int64), split, classnames, [], None, str(root))


class _Files(Dataset):
    """Image files as `(tensor, row)`; an unreadable one as a counted skip."""

    def __init__(self, files: list[Path], rows: np.ndarray, transform) -> None:
        self.files, self.rows, self.transform = files, rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        try:
            return self.transform(decode_image(self.files[row])), row
        except BadSample as e:
            return {"bad": e.reason, "id": str(self.files[row]), "index": row}


@torch.no_grad()
def _features(scorer: TrainedClassifier, data: LabelledImages, part: str, cfg: RunConfig) -> tuple:
    """(normalised image features, their rows, skipped (reason, path) pairs) of one split."""
    rows = np.flatnonzero(data.split == part)
    dataset = _Files(data.files, rows, pil_transform(scorer.loaded.preprocess))
    loader = DataLoader(
        dataset, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers, collate_fn=collate_labeled
    )
    feats, kept, skipped = [], [], []
    for batch in tqdm(loader, desc=f"eval {part}", leave=False, dynamic_ncols=True):
        skipped += batch["skipped"]
        if len(batch["label"]):
            feats.append(scorer.encode_images(batch["image"]))
            kept.append(batch["label"])
    if not feats:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long), skipped
    return torch.cat(feats), torch.cat(kept), skipped


def evaluate_own_data(cfg: RunConfig, name: str, device: torch.device) -> dict:
    """Metrics (percent) of model `name` on the labelled images `cfg.data` names: zero-shot on the test
    split (`eval.split val`: on the validation split, to choose settings on), and on the test split the
    linear probe (unless `eval.linear_probe false`) and, with captions, retrieval."""
    ec = cfg.eval
    if ec.protocol != "standard":
        raise ConfigError(
            f"eval.protocol {ec.protocol} scores the lab (base/novel classes, shifted test sets) or a paper "
            "suite (--suite); on your own images only the standard evaluation runs"
        )
    data = read_labelled(cfg)
    _check_files(data, cfg)
    scorer = TrainedClassifier(cfg, name, device)
    weights, note = scorer.weights(data.classnames, data.templates, by_position=True)
    scored, scored_rows, skipped = _features(scorer, data, ec.split, cfg)
    if not len(scored_rows):
        raise ValueError(
            f"{data.where}: no readable {ec.split} image ({len(skipped)} skipped, e.g. {skipped[:3]})"
        )
    labels = torch.tensor(data.labels)
    zs = zeroshot_accuracy(scorer.class_features(scored), labels[scored_rows], weights)
    metrics: dict = {
        "params": scorer.params,
        "classifier": scorer.kind,
        "classes": len(data.classnames),
        f"{ec.split}_images": len(scored_rows),
        "zeroshot_top1": zs["acc1"],
        "zeroshot_top5": zs["acc5"],
        "zeroshot_mean_per_class_recall": zs["mean_per_class_recall"],
    }
    on_test = ec.split == "test"  # the probe and retrieval score the test split only, as on the lab
    if on_test and ec.linear_probe:
        train, train_rows, bad_train = _features(scorer, data, "train", cfg)
        val, val_rows, bad_val = _features(scorer, data, "val", cfg)
        skipped += bad_train + bad_val
        if len(train_rows) and len(val_rows):
            fit = (train, labels[train_rows], val, labels[val_rows])
            probe = linear_probe(*fit, scored, labels[scored_rows])
            metrics |= {"linear_probe_top1": probe["acc1"], "linear_probe_c": probe["best_c"]}
            metrics["train_images"] = len(train_rows) + len(val_rows)
    if on_test and data.captions is not None and scorer.has_text_tower:
        k = cfg.eval.retrieval_size
        texts = scorer.encode_texts([data.captions[r] for r in scored_rows[:k].tolist()])
        retrieval = retrieval_recall(scored[:k], texts, text_to_image=torch.arange(len(texts)))
        for n in (1, 5, 10):
            metrics[f"retrieval_i2t_r{n}"] = retrieval[f"text_retrieval_recall@{n}"]
            metrics[f"retrieval_t2i_r{n}"] = retrieval[f"image_retrieval_recall@{n}"]
        metrics["retrieval_rule"] = retrieval["rule"]
    metrics["skipped_images"] = len(skipped)
    if note:
        metrics["note"] = note
    return metrics


def _check_files(data: LabelledImages, cfg: RunConfig) -> None:
    """Most image files missing means wrong paths, not bad files: one line that says where we looked."""
    missing = [f for f in data.files if not f.is_file()]
    if len(missing) > cfg.embed.max_skip_fraction * len(data.files):
        hint = path_hint(Path(data.where).parent, data.paths) if data.paths is not None else ""
        raise ConfigError(
            f"{len(missing)} of {len(data.files)} images listed in {data.where} do not exist "
            f"(e.g. {[str(m) for m in missing[:3]]}). {hint}"
        )


def markdown(name: str, where: str, metrics: dict) -> str:
    """The eval as a small table a person reads."""
    rows = [(k, v) for k, v in metrics.items() if k != "note"]
    lines = [f"Model `{name}` on `{where}`", "", "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows]
    if metrics.get("note"):
        lines += ["", f"Note: {metrics['note']}"]
    return "\n".join(lines) + "\n"
