"""The classifier of a trained model, built one way for evaluation, the paper suites and prediction.

Three kinds, chosen by what the run folder holds:
- `zeroshot`: any CLIP model; class weights from its text tower and prompt templates.
- `text_bank`: a prompt-tuned teacher (ComKD stage 1); class weights are its stored text bank, and
  its visual prompts, if it learned any, run in its image tower.
- `comkd_head`: a ComKD student, which has no text tower; its image feature goes through the head and
  is compared with the teacher's text bank that the head stores.
A bank's classes are looked up by name (stage 1's `split.json`), so a subset or another order of
them scores right; names it does not hold are refused, or with `by_position` scored by row with a note.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipdistill.config import ConfigError, RunConfig, trained_config
from clipdistill.models.factory import LoadedModel, count_parameters, create_teacher
from clipdistill.models.heads import SPLIT, TEXT_BANK, ComkdHead, load_head
from clipdistill.models.prompts import attach_visual_prompts
from clipdistill.runs import find_run, model_dir


def load_trained(cfg: RunConfig, name: str) -> LoadedModel:
    """The model a `train` run produced (or the configured teacher for name == "teacher"), frozen."""
    if name == "teacher":
        return create_teacher(cfg.teacher, lab_data=cfg.data.kind == "lab")
    folder = model_dir(cfg, name)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"no trained model at {weights}: run `clipdistill train --train.name {name}` first")
    trained = trained_config(folder)
    model_cfg = trained.teacher if trained.train.role == "teacher" else trained.student
    model_cfg.pretrained = str(weights)
    return create_teacher(model_cfg)  # frozen, eval mode


class TrainedClassifier:
    """A trained model as normalised image features and class weights over any class names it knows."""

    def __init__(self, cfg: RunConfig, name: str, device: torch.device | str = "cpu") -> None:
        self.name, self.device = name, torch.device(device)
        self.loaded: LoadedModel = load_trained(cfg, name)
        self.loaded.model.to(self.device)
        folder = model_dir(cfg, name)
        self.head: ComkdHead | None = load_head(folder) if name != "teacher" else None
        self.bank: torch.Tensor | None = None  # [C, D], normalised
        self.bank_names: list[str] | None = None
        self.visual_prompts = False
        if self.head is not None:
            self.kind = "comkd_head"
            self.head.to(self.device)
            self.bank = self.head.text_bank.float().cpu()
            self.bank_names = head_classnames(folder)
            self.visual_prompts = attach_visual_prompts(self.loaded.model, folder)  # stage 2's, if learned
        elif name != "teacher" and (folder / TEXT_BANK).is_file():
            self.kind = "text_bank"
            bank = torch.from_numpy(np.load(folder / TEXT_BANK, allow_pickle=False)).float()
            self.bank = F.normalize(bank, dim=-1)
            self.bank_names = _bank_names(folder)
            self.visual_prompts = attach_visual_prompts(self.loaded.model, folder)
        else:
            self.kind = "zeroshot"

    @property
    def params(self) -> int:
        """Parameters that run at inference: a ComKD student deploys its image tower and head only."""
        if self.head is None:
            return count_parameters(self.loaded.model)
        return count_parameters(self.loaded.model.visual) + count_parameters(self.head)

    @property
    def has_text_tower(self) -> bool:
        return self.head is None

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised model input [B, 3, S, S] -> L2-normalised image features (on the CPU)."""
        return F.normalize(self.loaded.model.encode_image(pixels.to(self.device)).float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 512) -> torch.Tensor:
        out = [
            self.loaded.encode_text(texts[i : i + batch_size], self.device).float().cpu()
            for i in range(0, len(texts), batch_size)
        ]
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def class_features(self, features: torch.Tensor) -> torch.Tensor:
        """What is compared with the class weights: the head's output for a ComKD student."""
        return features if self.head is None else self.head(features.to(self.device)).float().cpu()

    def weights(
        self,
        classnames: list[str],
        templates: list[str],
        all_names: list[str] | None = None,
        by_position: bool = False,
    ) -> tuple[torch.Tensor, str]:
        """Class weights [D, C] over `classnames`, and a note ("" when there is nothing to say).

        A bank without stored names is read in the order of `all_names` (the data's full class list,
        default `classnames`). Names the bank does not hold are refused, unless `by_position`: then
        the bank's rows score the classes in order when their counts agree, and the note says so."""
        if self.bank is None:
            return zeroshot_classifier(self.encode_texts, classnames, templates), ""
        names = self.bank_names or all_names or classnames
        return bank_weights(self.bank, names, classnames, self.name, by_position)


def bank_weights(
    bank: torch.Tensor, names: list[str], classnames: list[str], model: str, by_position: bool = False
) -> tuple[torch.Tensor, str]:
    """The rows of a text bank [C, D] named `classnames`, as class weights [D, C], and a note.

    `names` are the bank's rows in order. One function for every backend, so a model scores the same
    classes whether it runs in PyTorch or from its ONNX export."""
    if len(names) != len(bank):
        raise ConfigError(
            f"the model's text bank has {len(bank)} classes but its names (or the data's) "
            f"{len(names)}: was it trained on this data?"
        )
    index = {n: i for i, n in enumerate(names)}
    missing = [c for c in classnames if c not in index]
    if not missing:
        return bank[[index[c] for c in classnames]].T, ""
    held = f"{', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
    if by_position and len(classnames) == len(bank):
        note = (
            f"{model} classifies with the {len(bank)} classes of its stored text bank ({held}), not these "
            f"class names ({len(missing)} differ, e.g. {missing[:3]}): they are scored by position"
        )
        return bank.T, note
    raise ConfigError(
        f"{len(missing)} classes are not in the model's text bank ({model}), e.g. {missing[:3]}; "
        f"it holds {len(names)} ({held}): a model with a text bank scores only the classes it was trained on"
    )


@torch.no_grad()
def zeroshot_classifier(
    encode_text: Callable[[list[str]], torch.Tensor],
    classnames: list[str],
    templates: list[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """Class weights [D, C]: per class, the re-normalised mean of its L2-normalised prompt embeddings.

    Normalising each prompt before averaging keeps one long or odd template from dominating the
    ensemble; re-normalising makes the logits cosine similarities.
    """
    texts = [template.format(c=name) for name in classnames for template in templates]
    features = torch.cat(
        [
            F.normalize(encode_text(texts[i : i + batch_size]).float(), dim=-1)
            for i in range(0, len(texts), batch_size)
        ]
    )
    per_class = features.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).T


def head_classnames(student_folder: Path) -> list[str] | None:
    """The class names of a ComKD student's text bank, in row order: those of the prompt-tuned teacher it
    was distilled from (a multi-seed lab: the same seed's); None when that teacher's split.json is gone."""
    trained = trained_config(student_folder)
    name = trained.comkd.prompt_teacher
    return _bank_names(find_run(trained, name, SPLIT) or model_dir(trained, name))


def _bank_names(folder: Path) -> list[str] | None:
    """The class names of a stage-1 text bank, in its row order (None when split.json is absent)."""
    path = folder / SPLIT
    return json.loads(path.read_text())["classnames"] if path.is_file() else None
