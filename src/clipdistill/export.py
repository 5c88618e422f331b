"""The `export` stage: a trained model as files that ship without this package.

`export/open_clip/` loads with `open_clip.create_model("local-dir:<folder>")` (weights, config and
tokenizer files in one folder); `export/onnx/` holds image and text encoders for onnxruntime, the
preprocessing they expect, and for ComKD students the head and the class-text bank they classify with,
with the bank's class names. open_clip's format has no place for that head, so a ComKD student ships
as ONNX only.
"""

from __future__ import annotations

import shutil
import warnings
from importlib.util import find_spec
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.checkpoint import atomic_write, load_state_dict, save_npy, save_state_dict, write_json
from clipdistill.config import ConfigError, RunConfig
from clipdistill.models.classifier import head_classnames, load_trained
from clipdistill.models.factory import LoadedModel, _resolve_hf_names
from clipdistill.models.heads import TEXT_BANK, ComkdHead, load_head
from clipdistill.runs import model_dir, model_name, sweep_temps

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class _ImageEncoder(nn.Module):
    """Pixels -> L2-normalised embedding: the normalisation belongs in the graph, not in every caller."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixels), dim=-1)


class _TextEncoder(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(tokens), dim=-1)


class _Head(nn.Module):
    """Normalised student embedding -> normalised feature in the teacher's space (compare with the bank)."""

    def __init__(self, head: ComkdHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(features), dim=-1)


def tokenizer_spec(config: dict) -> dict:
    """What rebuilds the tokenizer: the resolved Hugging Face folder ("" = open_clip's BPE) and the length."""
    text = _resolve_hf_names(config).get("text_cfg", {})
    name = text.get("hf_tokenizer_name") or text.get("hf_model_name") or ""
    return {"hf_tokenizer_name": name, "context_length": int(text.get("context_length", 77))}


def copy_tokenizer(loaded: LoadedModel, folder: Path) -> bool:
    """Copy a Hugging Face tokenizer's files into `folder`, so the export needs no other folder."""
    tokenizer = tokenizer_spec(loaded.config)["hf_tokenizer_name"]
    for name in TOKENIZER_FILES if tokenizer else ():
        if (Path(tokenizer) / name).is_file():
            atomic_write(folder / name, lambda tmp, src=Path(tokenizer) / name: shutil.copyfile(src, tmp))
    return bool(tokenizer)


def _start(folder: Path, done_mark: str) -> None:
    """Open an export folder: its done mark (the file written last) and a killed run's leftovers go."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / done_mark).unlink(missing_ok=True)
    sweep_temps(folder)


def export_open_clip(loaded: LoadedModel, folder: Path) -> Path:
    """open_clip's `local-dir:` layout; Hugging Face paths resolved and the tokenizer files copied in,
    because open_clip reads an HF tokenizer of a local-dir model from that folder. The config is written
    last and removed first: a folder without it is an unfinished export (a killed one), never loaded."""
    _start(folder, "open_clip_config.json")
    config = _resolve_hf_names(loaded.config)
    model_cfg = {k: v for k, v in config.items() if k != "preprocess_cfg"}
    pre = loaded.preprocess
    copy_tokenizer(loaded, folder)
    save_state_dict(loaded.model.state_dict(), folder / "open_clip_model.safetensors")
    write_json(
        folder / "open_clip_config.json",
        {
            "model_cfg": model_cfg,
            "preprocess_cfg": {"size": pre.image_size, "mean": list(pre.mean), "std": list(pre.std)},
        },
    )
    return folder


def _onnx(module: nn.Module, example: torch.Tensor, path: Path, names: tuple[str, str], opset: int) -> None:
    """One encoder with a dynamic batch axis (TorchScript exporter: the dynamo one needs onnxscript)."""
    module.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel has no ONNX export
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        try:
            atomic_write(
                path,
                lambda tmp: torch.onnx.export(
                    module,
                    (example,),
                    str(tmp),
                    input_names=[names[0]],
                    output_names=[names[1]],
                    dynamic_axes={names[0]: {0: "batch"}, names[1]: {0: "batch"}},
                    opset_version=opset,
                    dynamo=False,
                ),
            )
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)


def export_image_encoder(model: nn.Module, image_size: int, path: Path, opset: int = 17) -> Path:
    """pixels [N, 3, S, S] float32 -> normalised embeddings [N, D]; N is dynamic."""
    example = torch.zeros(2, 3, image_size, image_size)
    _onnx(_ImageEncoder(model.cpu().eval()), example, path, ("pixels", "embedding"), opset)
    return path


def export_onnx(
    loaded: LoadedModel,
    folder: Path,
    head: ComkdHead | None = None,
    classnames: list[str] | None = None,
    opset: int = 17,
) -> Path:
    """image_encoder.onnx, text_encoder.onnx, preprocess.json; head.onnx + text_bank.npy for ComKD, and
    in preprocess.json the bank's `classnames` (null when unknown), so labels are looked up by name as
    the PyTorch model does. preprocess.json is written last and removed first: without it the folder is
    an unfinished export."""
    _start(folder, "preprocess.json")
    model = loaded.model.cpu().eval()
    size = loaded.preprocess.image_size
    export_image_encoder(model, size, folder / "image_encoder.onnx", opset)
    tokens = loaded.tokenizer(["a photo of a cat.", "a dog"]).long()
    _onnx(_TextEncoder(model), tokens, folder / "text_encoder.onnx", ("tokens", "embedding"), opset)
    spec = {
        "image_size": size,
        "mean": list(loaded.preprocess.mean),
        "std": list(loaded.preprocess.std),
        # "." = the tokenizer files copied next to the encoders ("" = open_clip's own BPE)
        "tokenizer": tokenizer_spec(loaded.config)
        | {"hf_tokenizer_name": "." if copy_tokenizer(loaded, folder) else ""},
        "embed_dim": loaded.embed_dim,
        "logit_scale": float(model.logit_scale.exp()),
    }
    if head is not None:
        head = head.cpu().eval()
        _onnx(
            _Head(head),
            torch.zeros(2, loaded.embed_dim),
            folder / "head.onnx",
            ("embedding", "feature"),
            opset,
        )
        bank = head.text_bank.float().numpy()
        save_npy(folder / "text_bank.npy", bank)
        spec["head"] = {
            "logit_scale": float(head.logit_scale),
            "classes": int(bank.shape[0]),
            "classnames": classnames,
        }
    write_json(folder / "preprocess.json", spec)
    return folder


def refuse_prompted_model(folder: Path, head: ComkdHead | None) -> None:
    """A model that classifies with what export does not carry: a ComKD student's learned visual prompts,
    or a prompt-tuned teacher's text bank (its export would zero-shot with plain prompts instead)."""
    if head is not None and "visual_prompts.prompts" in load_state_dict(folder / "heads.safetensors"):
        raise ConfigError(
            f"{folder.name} runs its image tower with learned visual prompts, which export does not carry "
            "yet: evaluate and predict it with the torch backend"
        )
    if head is None and (folder / TEXT_BANK).is_file():
        raise ConfigError(
            f"{folder.name} is a prompt-tuned teacher: it classifies with its learned text bank, which "
            "export does not carry yet: evaluate and predict it with the torch backend, or export the "
            "ComKD student distilled from it"
        )


def run_export(cfg: RunConfig) -> dict:
    """Export `cfg.export.model` of the run dir in `cfg.export.format`; `all` is every format that holds
    the model, which for a ComKD student is ONNX alone (the result's note says so)."""
    fmt = cfg.export.format
    if fmt in ("onnx", "all") and find_spec("onnx") is None:  # torch's exporter imports it at the end
        raise ConfigError(
            "ONNX export needs the onnx package: pip install 'clipdistill[onnx]' (or, but for a ComKD "
            "student, --format open_clip)"
        )
    name = model_name(cfg, cfg.export.model)
    loaded = load_trained(cfg, name)
    head = load_head(model_dir(cfg, name)) if name != "teacher" else None
    if head is not None and fmt == "open_clip":
        raise ConfigError(
            f"{name} is a ComKD student: it classifies through its head and the teacher's text bank, which "
            "open_clip's format cannot hold; --format onnx exports them (head.onnx, text_bank.npy)"
        )
    refuse_prompted_model(model_dir(cfg, name), head)
    out = model_dir(cfg, name) / "export"
    result: dict = {"model": name}
    if fmt in ("open_clip", "all") and head is None:
        result["open_clip"] = str(export_open_clip(loaded, out / "open_clip"))
    elif fmt == "all":
        result["note"] = "no open_clip export: open_clip's format cannot hold a ComKD student's head"
    if fmt in ("onnx", "all"):
        classnames = head_classnames(model_dir(cfg, name)) if head is not None else None
        result["onnx"] = str(export_onnx(loaded, out / "onnx", head, classnames, cfg.export.opset))
    return result
