"""ComKD stage 1 (DESIGN 4): the teacher learns text prompts with cross-entropy on labeled BASE classes.

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

from clipdistill.checkpoint import load_state_dict
from clipdistill.config import ComkdConfig, ConfigError, RunConfig
from clipdistill.data.lab import load_lab, to_pixels
from clipdistill.evaluate.protocols import base_novel_split
from clipdistill.models.factory import Preprocess, build_tokenizer, load_model_config, preprocess_for
from clipdistill.models.prompts import TextPromptLearner, VisualPromptLearner

TEXT_BANK = "text_bank.npy"
SPLIT = "split.json"
IMAGE_FEATURES = "image_features.npy"


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
        images: torch.Tensor | None = None,
        preprocess: Preprocess | None = None,
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
        self.images, self.preprocess = images, preprocess  # the training images, for export
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
        image = F.normalize(self.encode_image(batch["image"][keep]), dim=-1)
        logits = self.model.logit_scale.exp() * image @ text.T
        loss = F.cross_entropy(logits, target[keep])
        acc = (logits.argmax(dim=1) == target[keep]).float().mean()
        return {"loss": loss, "ce": loss.detach(), "acc": acc.detach()}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's image feature, through the visual prompts when there are any."""
        if self.visual_prompts is not None:
            return self.visual_prompts(self.model.visual, images)
        with torch.no_grad():
            return self.model.encode_image(images)

    def after_step(self) -> None:
        pass

    def heads(self) -> dict[str, nn.Module]:
        heads = {"prompts": self.prompts}
        if self.visual_prompts is not None:
            heads["visual_prompts"] = self.visual_prompts
        return heads

    @torch.no_grad()
    def image_features(self, batch_size: int = 512) -> torch.Tensor:
        """Normalised prompted features of every training image (float16, cache row order)."""
        device = self.prompts.ctx.device
        out = []
        for start in range(0, len(self.images), batch_size):
            pixels = to_pixels(self.images[start : start + batch_size], self.preprocess.image_size)
            x = self.preprocess.normalize(pixels).to(device)
            out.append(F.normalize(self.encode_image(x).float(), dim=-1).half().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_bank(self) -> torch.Tensor:
        """W_t [K, D]: normalised prompted text features of every class name."""
        return F.normalize(self.prompts(self.model).float(), dim=-1).cpu()

    def export(self, out: Path) -> None:
        """Write the text bank and the split: what stage 2 reads instead of the teacher's text tower."""
        np.save(out / TEXT_BANK, self.text_bank().numpy())
        if self.visual_prompts is not None:
            np.save(out / IMAGE_FEATURES, self.image_features().numpy())
        base = self.base.tolist()
        novel = [c for c in range(len(self.classnames)) if c not in base]
        (out / SPLIT).write_text(json.dumps({"classnames": self.classnames, "base": base, "novel": novel}))


def attach_visual_prompts(model: nn.Module, folder: Path) -> None:
    """Route `model.encode_image` through the visual prompts stage 1 saved in `folder`, if any (eval)."""
    heads = Path(folder) / "heads.safetensors"
    state = load_state_dict(heads) if heads.is_file() else {}
    if "visual_prompts.prompts" not in state:
        return
    prompts = state["visual_prompts.prompts"]
    vpt = VisualPromptLearner(model.visual, prompts.shape[0], prompts.shape[1])
    vpt.load_state_dict({"prompts": prompts})
    vpt.requires_grad_(False).to(next(model.parameters()).device)
    model.encode_image = lambda images, normalize=False: vpt(model.visual, images)


def build_prompt_teacher(cfg: RunConfig, model: nn.Module, cache) -> PromptTeacherTask:
    if cfg.train.role != "teacher":
        raise ConfigError("train.method prompt_teacher tunes the teacher's prompts: set --train.role teacher")
    if cfg.data.kind != "lab":
        raise ConfigError(
            "train.method prompt_teacher needs class labels: it runs on the lab (data.kind lab)"
        )
    lab = load_lab(cfg.data)
    base, _ = base_novel_split(len(lab.classnames), cfg.comkd.base_fraction, cfg.comkd.split_seed)
    config = load_model_config(cfg.teacher.name)
    return PromptTeacherTask(
        model,
        build_tokenizer(config),
        lab.classnames,
        lab.train.labels,
        base,
        cfg.comkd,
        images=lab.train.images,
        preprocess=preprocess_for(config),
    )
