"""ComKD stage 1 (DESIGN 4): the teacher learns text prompts with cross-entropy on labeled BASE classes.

Everything in the teacher stays frozen; only the CoOp context trains. When training ends the task
writes, next to the run's outputs, the text bank W_t (L2-normalised features of ALL class names,
base and novel, with the learned context) and the base/novel split: all that stage 2 and the
student's inference need from the teacher's text side. Deep visual prompts (VPT) are not built
yet, so the teacher's image features are the plain ones and the usual teacher cache serves stage 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.config import ComkdConfig, ConfigError, RunConfig
from clipdistill.data.lab import load_lab
from clipdistill.evaluate.protocols import base_novel_split
from clipdistill.models.factory import build_tokenizer, load_model_config
from clipdistill.models.prompts import TextPromptLearner

TEXT_BANK = "text_bank.npy"
SPLIT = "split.json"


class PromptTeacherTask(nn.Module):
    """CE over the base classes of `softmax(scale·image·prompt_text(base)ᵀ)`; labels looked up by
    sample index, samples of novel classes ignored (they are unlabeled for this stage)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        classnames: list[str],
        labels: torch.Tensor,
        base: list[int],
        cfg: ComkdConfig,
    ) -> None:
        super().__init__()
        if cfg.vpt_depth or cfg.vpt_tokens:
            raise ConfigError("comkd.vpt_depth / vpt_tokens: deep visual prompts are not implemented yet")
        model.requires_grad_(False)
        self.model = model
        self.classnames = list(classnames)
        self.prompts = TextPromptLearner(model, tokenizer, classnames, cfg.n_ctx)
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
        with torch.no_grad():
            image = F.normalize(self.model.encode_image(batch["image"][keep]), dim=-1)
        logits = self.model.logit_scale.exp() * image @ text.T
        loss = F.cross_entropy(logits, target[keep])
        acc = (logits.argmax(dim=1) == target[keep]).float().mean()
        return {"loss": loss, "ce": loss.detach(), "acc": acc.detach()}

    def after_step(self) -> None:
        pass

    def heads(self) -> dict[str, nn.Module]:
        return {"prompts": self.prompts}

    @torch.no_grad()
    def text_bank(self) -> torch.Tensor:
        """W_t [K, D]: normalised prompted text features of every class name."""
        return F.normalize(self.prompts(self.model).float(), dim=-1).cpu()

    def export(self, out: Path) -> None:
        """Write the text bank and the split: what stage 2 reads instead of the teacher's text tower."""
        np.save(out / TEXT_BANK, self.text_bank().numpy())
        base = self.base.tolist()
        novel = [c for c in range(len(self.classnames)) if c not in base]
        (out / SPLIT).write_text(json.dumps({"classnames": self.classnames, "base": base, "novel": novel}))


def build_prompt_teacher(cfg: RunConfig, model: nn.Module, cache) -> PromptTeacherTask:
    if cfg.train.role != "teacher":
        raise ConfigError("train.method prompt_teacher tunes the teacher's prompts: set --train.role teacher")
    if cfg.data.kind != "lab":
        raise ConfigError(
            "train.method prompt_teacher needs class labels: it runs on the lab (data.kind lab)"
        )
    lab = load_lab(cfg.data)
    base, _ = base_novel_split(len(lab.classnames), cfg.comkd.base_fraction, cfg.comkd.split_seed)
    tokenizer = build_tokenizer(load_model_config(cfg.teacher.name))
    return PromptTeacherTask(model, tokenizer, lab.classnames, lab.train.labels, base, cfg.comkd)
