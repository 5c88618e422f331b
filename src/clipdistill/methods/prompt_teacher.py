"""ComKD stage 1 (docs/methods.md): the teacher learns text prompts with cross-entropy on labeled BASE
classes.

Everything in the teacher stays frozen; only the CoOp context trains. When training ends the task
writes, next to the run's outputs, the text bank W_t (L2-normalised features of ALL class names,
base and novel, with the learned context) and the base/novel split: all that stage 2 and the
student's inference need from the teacher's text side. With deep visual prompts (VPT,
`comkd.vpt_depth` > 0) the teacher's image features change too, so it also writes the prompted
features of every training image (`image_features.npy`, one row per cache row), which stage 2
then uses instead of the plain teacher cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.cache import TeacherCache
from clipdistill.checkpoint import atomic_write, save_npy
from clipdistill.config import ComkdConfig, ConfigError, RunConfig
from clipdistill.data.sources import make_pair_source
from clipdistill.methods.comkd import COMKD_MODULE_KEYS, refuse_ensemble_cache
from clipdistill.methods.labelled import labelled_train
from clipdistill.methods.task import CacheUse, Task
from clipdistill.models.factory import build_tokenizer, preprocess_for, resolve_source
from clipdistill.models.heads import SPLIT, TEXT_BANK
from clipdistill.models.prompts import TextPromptLearner, VisualPromptLearner

IMAGE_FEATURES = "image_features.npy"


class PromptTeacherTask(Task):
    """CE over the base classes of `softmax(scale·image·prompt_text(base)ᵀ)`; labels looked up by
    sample index, samples of novel classes ignored (they are unlabeled for this stage). It trains on
    the `labelled` rows (None: every row) and reads the cached teacher features when there are any."""

    cache_use = CacheUse.OPTIONAL
    sections = ("comkd",)
    adapts_pretrained_teacher = True
    lab_data_keys = ("shots",)  # the lab's stage 1 learns from data.shots images per base class

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        classnames: list[str],
        labels: torch.Tensor,
        base: list[int],
        cfg: ComkdConfig,
        source=None,
        labelled: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        if bool(cfg.vpt_depth) != bool(cfg.vpt_tokens):
            raise ConfigError(
                "comkd.vpt_depth and comkd.vpt_tokens: set both (deep visual prompts) or neither"
            )
        model.requires_grad_(False)
        self.model = model
        self.classnames = list(classnames)
        self.prompts = TextPromptLearner(model, tokenizer, classnames, cfg.n_ctx)
        self.visual_prompts = None
        if cfg.vpt_depth:
            self.visual_prompts = VisualPromptLearner(model.visual, cfg.vpt_depth, cfg.vpt_tokens)
        self.source = source  # the training pair source: its images, for export
        self.labelled = labelled
        class_to_base = torch.full((len(classnames),), -1, dtype=torch.long)
        class_to_base[torch.tensor(base)] = torch.arange(len(base))
        self.register_buffer("base", torch.tensor(base, dtype=torch.long), persistent=False)
        self.register_buffer("base_label", class_to_base[labels], persistent=False)  # -1 = novel sample

    def train(self, mode: bool = True) -> PromptTeacherTask:
        super().train(mode)
        self.model.eval()  # frozen teacher: no dropout in its towers
        return self

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        target = self.base_label[batch["index"].to(self.base_label.device)]
        keep = target >= 0
        text = F.normalize(self.prompts(self.model)[self.base], dim=-1)
        if not keep.any():  # a batch of novel-class images only: nothing labeled to learn from
            zero = text.sum() * 0
            return {"loss": zero, "ce": zero.detach(), "acc": zero.detach()}
        cached = batch.get("teacher_image")
        image = F.normalize(
            self.encode_image(batch["image"][keep], None if cached is None else cached[keep]), dim=-1
        )
        logits = self.model.logit_scale.exp() * image @ text.T
        loss = F.cross_entropy(logits, target[keep])
        acc = (logits.argmax(dim=1) == target[keep]).float().mean()
        return {"loss": loss, "ce": loss.detach(), "acc": acc.detach()}

    def encode_image(self, images: torch.Tensor, cached: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's image feature, through the visual prompts when there are any; without
        them it is the frozen teacher's own feature, read from the cache when the run has one."""
        if self.visual_prompts is not None:
            return self.visual_prompts(self.model.visual, images)
        if cached is not None:
            return cached.float()
        with torch.no_grad():
            return self.model.encode_image(images)

    def training_pool(self, pool: np.ndarray) -> np.ndarray:
        """Stage 1's training rows: the pool within the labelled ones (every row of the lab)."""
        return pool if self.labelled is None else np.intersect1d(pool, self.labelled)

    def heads(self) -> dict[str, nn.Module]:
        heads = {"prompts": self.prompts}
        if self.visual_prompts is not None:
            heads["visual_prompts"] = self.visual_prompts
        return heads

    @classmethod
    def unread_keys(cls, method: str, values: dict) -> dict[str, dict[str, object]]:
        """Stage 1 reads none of ComKD's module keys (they are stage 2's)."""
        return {"comkd": dict.fromkeys(COMKD_MODULE_KEYS)}

    @classmethod
    def from_config(cls, cfg: RunConfig, model: nn.Module, cache: TeacherCache | None) -> PromptTeacherTask:
        return build_prompt_teacher(cfg, model, cache)

    @torch.no_grad()
    def image_features(self, batch_size: int = 512) -> torch.Tensor:
        """Normalised prompted features of every training image (float16, cache row order; zeros for an
        image that cannot be read, a row the cache marks invalid too)."""
        device = self.prompts.ctx.device
        rows = np.arange(len(self.source))
        out = None
        for batch in self.source.batches(rows[i : i + batch_size] for i in range(0, len(rows), batch_size)):
            if len(batch["index"]) == 0:
                continue
            features = F.normalize(self.encode_image(batch["image"].to(device)).float(), dim=-1).half().cpu()
            if out is None:
                out = torch.zeros(len(rows), features.shape[1], dtype=torch.float16)
            out[batch["index"]] = features
        if out is None:
            raise ValueError("prompt_teacher: no training image could be read for the image features")
        return out

    @torch.no_grad()
    def text_bank(self) -> torch.Tensor:
        """W_t [K, D]: normalised prompted text features of every class name."""
        return F.normalize(self.prompts(self.model).float(), dim=-1).cpu()

    def export(self, out: Path) -> None:
        """Besides the weights, write the split, the image features and the text bank: what stage 2 reads
        instead of the teacher's text tower. Each atomically, the bank last: stage 2 looks for it, so it
        marks the rest."""
        super().export(out)
        base = self.base.tolist()
        novel = [c for c in range(len(self.classnames)) if c not in base]
        split = json.dumps({"classnames": self.classnames, "base": base, "novel": novel})
        atomic_write(out / SPLIT, lambda tmp: tmp.write_text(split))
        if self.visual_prompts is not None:
            save_npy(out / IMAGE_FEATURES, self.image_features().numpy())
        save_npy(out / TEXT_BANK, self.text_bank().numpy())


def build_prompt_teacher(cfg: RunConfig, model: nn.Module, cache: TeacherCache | None) -> PromptTeacherTask:
    if cfg.train.role != "teacher":
        raise ConfigError("train.method prompt_teacher tunes the teacher's prompts: set --train.role teacher")
    refuse_ensemble_cache(cache)
    train = labelled_train(cfg)
    config = resolve_source(cfg.teacher).config  # a hub or folder teacher's too, not only a named one
    tokenizer = build_tokenizer(config)
    return PromptTeacherTask(
        model,
        tokenizer,
        train.classnames,
        train.labels,
        train.base,
        cfg.comkd,
        source=make_pair_source(cfg.data, tokenizer, preprocess_for(config)),
        labelled=train.labelled,
    )
