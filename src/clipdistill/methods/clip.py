"""Plain CLIP training: the teacher's recipe and the no-distillation student baseline."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.cache import TeacherCache
from clipdistill.config import RunConfig
from clipdistill.losses.clip import ClipLoss
from clipdistill.methods.task import Task

MAX_LOGIT_SCALE = math.log(100)


class ClipTask(Task):
    """The symmetric contrastive loss of the model's own image and text embeddings."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.clip_loss = ClipLoss()

    def encode(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        image = F.normalize(self.model.encode_image(batch["image"]), dim=-1)
        text = F.normalize(self.model.encode_text(batch["text"]), dim=-1)
        return image, text

    @classmethod
    def from_config(cls, cfg: RunConfig, model: nn.Module, cache: TeacherCache | None) -> ClipTask:
        return cls(model)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        image, text = self.encode(batch)
        loss = self.clip_loss(image, text, self.model.logit_scale.exp())
        return {"loss": loss, "clip": loss.detach(), "term/clip": loss}

    @torch.no_grad()
    def after_step(self) -> None:
        """Keep the temperature in CLIP's range (logit scale at most 100)."""
        self.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
