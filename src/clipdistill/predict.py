"""`predict` and `embed-images`: use a trained (or exported) model on image files.

The same code runs the PyTorch model or its ONNX export, so what is measured in the lab is what ships.
A bad image file is reported as skipped, never a crash: a folder of user photos always holds a few.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clipdistill.checkpoint import atomic_write
from clipdistill.config import ConfigError, ModelConfig, load_config, replace
from clipdistill.data.images import BadSample, decode_image
from clipdistill.data.sources import pil_transform
from clipdistill.models.classifier import TrainedClassifier, bank_weights
from clipdistill.models.factory import (
    LoadedModel,
    ModelLoadError,
    Preprocess,
    build_tokenizer,
    create_teacher,
)
from clipdistill.runs import model_dir

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TEMPLATE = "a photo of a {}."


class TorchBackend:
    """A trained model in PyTorch, on the CPU; from a run folder, its classifier (`TrainedClassifier`:
    zero-shot, a prompt-tuned text bank or a ComKD head) picks the classes."""

    def __init__(self, loaded: LoadedModel, scorer: TrainedClassifier | None = None) -> None:
        self.loaded, self.scorer = loaded, scorer
        self.head = scorer.head if scorer is not None else None
        self.preprocess = loaded.preprocess
        self.logit_scale = float(loaded.model.logit_scale.exp())

    @torch.no_grad()
    def images(self, pixels: np.ndarray) -> np.ndarray:
        return F.normalize(self.loaded.model.encode_image(torch.from_numpy(pixels)), dim=-1).numpy()

    @torch.no_grad()
    def features(self, pixels: np.ndarray) -> np.ndarray:
        """What the class weights score: the image embedding, through the ComKD head when there is one."""
        if self.head is None:
            return self.images(pixels)
        return F.normalize(self.head(torch.from_numpy(self.images(pixels))), dim=-1).numpy()

    def classes(self, labels: list[str]) -> tuple[np.ndarray, float, str]:
        """Class weights [C, D] over `labels`, their logit scale and a note ("" when there is none)."""
        if self.scorer is None:
            return self.texts(labels), self.logit_scale, ""
        weights, note = self.scorer.weights(labels, [TEMPLATE.replace("{}", "{c}")], by_position=True)
        scale = float(self.head.logit_scale) if self.head is not None else self.logit_scale
        return weights.T.numpy(), scale, note

    @torch.no_grad()
    def texts(self, labels: list[str]) -> np.ndarray:
        prompts = [TEMPLATE.format(label) for label in labels]
        return F.normalize(self.loaded.encode_text(prompts), dim=-1).numpy()


class OnnxBackend:
    """An `export/onnx` folder run by onnxruntime (the tokenizer still comes from open_clip). A ComKD
    student's labels are looked up in its text bank by the class names the export stores, as in PyTorch."""

    def __init__(self, folder: str | Path, name: str | None = None) -> None:
        import onnxruntime as ort

        folder = Path(folder)
        self.name = name or str(folder)
        spec = json.loads((folder / "preprocess.json").read_text())
        if "head" in spec and "classnames" not in spec["head"]:
            raise ConfigError(
                f"{folder} is an ONNX export of a ComKD student without its class names (an older export): "
                "export it again (clipdistill export --format onnx)"
            )
        self.preprocess = Preprocess(spec["image_size"], tuple(spec["mean"]), tuple(spec["std"]))
        self.logit_scale = float(spec["logit_scale"])

        def session(name: str) -> ort.InferenceSession:
            return ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])

        self.image_session, self.text_session = session("image_encoder.onnx"), session("text_encoder.onnx")
        tokenizer = dict(spec["tokenizer"])
        if tokenizer.get("hf_tokenizer_name"):  # stored relative to the export folder
            tokenizer["hf_tokenizer_name"] = str((folder / tokenizer["hf_tokenizer_name"]).resolve())
        self.tokenizer = build_tokenizer({"text_cfg": {k: v for k, v in tokenizer.items() if v}})
        self.head_session, self.bank, self.bank_names, self.bank_scale = None, None, None, 0.0
        if "head" in spec:
            self.head_session = session("head.onnx")
            self.bank = np.load(folder / "text_bank.npy")
            self.bank_names = spec["head"]["classnames"]
            self.bank_scale = float(spec["head"]["logit_scale"])

    def images(self, pixels: np.ndarray) -> np.ndarray:
        return self.image_session.run(None, {"pixels": pixels})[0]

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """What the class weights score: the image embedding, through the ComKD head when there is one."""
        if self.head_session is None:
            return self.images(pixels)
        return self.head_session.run(None, {"embedding": self.images(pixels)})[0]

    def classes(self, labels: list[str]) -> tuple[np.ndarray, float, str]:
        """Class weights [C, D] over `labels`, their logit scale and a note, as `TorchBackend.classes`."""
        if self.bank is None:
            return self.texts(labels), self.logit_scale, ""
        names = self.bank_names or labels  # no names stored: the labels name the rows in order
        weights, note = bank_weights(torch.from_numpy(self.bank), names, labels, self.name, by_position=True)
        return weights.T.numpy(), self.bank_scale, note

    def texts(self, labels: list[str]) -> np.ndarray:
        tokens = self.tokenizer([TEMPLATE.format(label) for label in labels]).long().numpy()
        return self.text_session.run(None, {"tokens": tokens})[0]


def expand_images(paths: list[str]) -> list[Path]:
    """Files as given (a bad one is then reported) and the sorted image files under each folder."""
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(path)
    return out


def read_labels(labels: str | None, labels_file: str | None) -> list[str]:
    """Comma-separated labels, or a file with one per line (blank lines and # comments ignored)."""
    if labels_file:
        lines = Path(labels_file).read_text().splitlines()
        names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    else:
        names = [name.strip() for name in (labels or "").split(",") if name.strip()]
    if len(names) < 2:
        raise ValueError(f"need at least two labels to choose between, got {names}")
    return names


def pixel_batches(
    files: list[Path], preprocess: Preprocess, batch_size: int, skipped: list[dict]
) -> Iterator[tuple[list[Path], np.ndarray]]:
    """Decoded, normalised batches; undecodable files go to `skipped` with the reason."""
    transform = pil_transform(preprocess)
    for start in tqdm(range(0, len(files), batch_size), desc="images", unit="batch", leave=False):
        good, pixels = [], []
        for path in files[start : start + batch_size]:
            try:
                pixels.append(transform(decode_image(path)))
                good.append(path)
            except BadSample as e:
                skipped.append({"image": str(path), "reason": e.reason, "message": str(e)})
        if good:
            yield good, torch.stack(pixels).numpy().astype(np.float32)


def nothing_read(files: list[Path], skipped: list[dict]) -> str:
    """Why not one image was read: none was found, or each one was unreadable (the first reason)."""
    if not files:
        return f"no image file found (files ending in {', '.join(sorted(IMAGE_SUFFIXES))})"
    return f"none of the {len(files)} image file(s) could be read, e.g. {skipped[0]['message']}"


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predict(backend, files: list[Path], labels: list[str], batch_size: int = 64) -> dict:
    """Zero-shot probabilities over `labels` for each image; a model with a text bank (a ComKD student,
    a prompt-tuned teacher) scores the bank's rows that the labels name."""
    classes, scale, note = backend.classes(labels)
    skipped: list[dict] = []
    rows = []
    for paths, pixels in pixel_batches(files, backend.preprocess, batch_size, skipped):
        for path, p in zip(paths, _softmax(scale * backend.features(pixels) @ classes.T), strict=True):
            best = int(p.argmax())
            probs = {label: round(float(q), 6) for label, q in zip(labels, p, strict=True)}
            rows.append(
                {"image": str(path), "label": labels[best], "prob": round(float(p[best]), 6), "probs": probs}
            )
    if not rows:
        raise ValueError(nothing_read(files, skipped))
    return {"predictions": rows, "skipped": skipped} | ({"note": note} if note else {})


def embed_images(backend, folder: str | Path, out: str | Path, batch_size: int = 64) -> dict:
    """`out.npy` (float32, L2-normalised, one row per readable image) and `out.ids.txt` (paths under
    `folder`, same order), the two files a retrieval index is built from."""
    folder, out = Path(folder), Path(out)
    files = expand_images([str(folder)])
    skipped: list[dict] = []
    ids, feats = [], []
    for paths, pixels in pixel_batches(files, backend.preprocess, batch_size, skipped):
        feats.append(backend.images(pixels).astype(np.float32))
        ids += [str(p.relative_to(folder)) for p in paths]
    if not feats:
        raise ValueError(f"{folder}: {nothing_read(files, skipped)}")
    array = np.concatenate(feats)

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(out.with_name(out.name + ".npy"), save)
    atomic_write(
        out.with_name(out.name + ".ids.txt"), lambda tmp: tmp.write_text("".join(i + "\n" for i in ids))
    )
    return {"embeddings": f"{out}.npy", "ids": f"{out}.ids.txt", "count": len(ids), "skipped": skipped}


def load_backend(model: str, backend: str, config: str | None, run_dir: str | None):
    """An export folder (onnx/ or open_clip/) or a train folder name under the run dir."""
    path = Path(model)
    if (path / "preprocess.json").is_file():
        return OnnxBackend(path)
    if (path / "open_clip_config.json").is_file():  # exactly the folder's weights, or one clear line
        if backend == "onnx":
            raise ConfigError(
                f"{path} is an open_clip export; --backend onnx runs an ONNX export: pass its onnx/ folder "
                "(clipdistill export --format onnx) or the trained model's name with --run-dir"
            )
        return TorchBackend(create_teacher(ModelConfig(name=f"local-dir:{path}")))
    cfg = load_config(config, ["--run_dir", run_dir] if run_dir else [])
    if backend == "onnx":
        folder = model_dir(cfg, model) / "export" / "onnx"
        if not (folder / "preprocess.json").is_file():
            from clipdistill.export import run_export

            run_export(replace(cfg, {"export.model": model, "export.format": "onnx"}))
        return OnnxBackend(folder, model)
    scorer = TrainedClassifier(cfg, model)
    return TorchBackend(scorer.loaded, scorer)


def _table(result: dict) -> str:
    lines = [f"{'image':40s} {'label':20s} prob"]
    lines += [f"{r['image']:40s} {r['label']:20s} {r['prob']:.4f}" for r in result["predictions"]]
    lines += [f"skipped {s['image']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipdistill")
    sub = parser.add_subparsers(dest="stage", required=True)
    pred = sub.add_parser("predict", help="zero-shot labels of image files or folders")
    pred.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    labels = pred.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help='comma-separated class names, e.g. "cat,dog,bird"')
    labels.add_argument("--labels-file", "--labels_file", help="class names, one per line")
    pred.add_argument("--format", choices=("json", "table"), default="json")
    emb = sub.add_parser("embed-images", help="embeddings of an image folder: OUT.npy + OUT.ids.txt")
    emb.add_argument("folder")
    emb.add_argument("--out", required=True, help="output path prefix")
    for p in (pred, emb):
        p.add_argument("--model", required=True, help="train folder name in the run dir, or an export folder")
        p.add_argument("--backend", choices=("torch", "onnx"), default="torch")
        p.add_argument("--batch-size", "--batch_size", type=int, default=64)
        p.add_argument("--config", help="YAML run config (for the run dir)")
        p.add_argument("--run-dir", "--run_dir", help="the run dir holding --model (default: the config's)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        backend = load_backend(args.model, args.backend, args.config, args.run_dir)
        if args.stage == "embed-images":
            result = embed_images(backend, args.folder, args.out, args.batch_size)
        else:
            files = expand_images(args.images)
            result = predict(backend, files, read_labels(args.labels, args.labels_file), args.batch_size)
            if args.format == "table":
                print(_table(result))
                return 0
    except (ConfigError, ModelLoadError, FileNotFoundError, ValueError) as e:
        print(f"clipdistill {args.stage}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    print(json.dumps(result, indent=2))
    return 0
