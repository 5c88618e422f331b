"""The distillation baselines (docs/methods.md) as recipes on the shared trainer.

Each is L = L_clip(student) + λ·L_kd with L_kd one loss of `clipdistill.losses.baselines`, fed
the cached teacher rows of the batch (the teacher never runs here). open_clip's `DistillClipLoss`
already contains the student's CLIP loss, so that recipe uses it alone.
"""

from __future__ import annotations

import torch
from torch import nn

from clipdistill.cache import TeacherCache
from clipdistill.config import ConfigError, DistillConfig, RunConfig
from clipdistill.losses.baselines import (
    AffinityMimickingLoss,
    ContrastiveRelationalLoss,
    DistillClipLoss,
    FeatureDistillLoss,
    InteractiveContrastiveLoss,
)
from clipdistill.methods.clip import ClipTask
from clipdistill.methods.task import CacheUse

BASELINES = ("fd", "crd", "icl", "tinyclip_affinity", "openclip_distill")
# Losses that compare embeddings directly, so they learn a projection to the teacher's width.
_PROJECTED = ("fd", "icl")


class BaselineTask(ClipTask):
    """One baseline recipe; `kind` picks the distillation loss. Logs `clip` and `kd` parts.

    For openclip_distill `kd` is its soft cross-entropy (the loss minus the CLIP part) and
    `distill.weight` does not apply: open_clip's recipe has no weight.
    """

    cache_use = CacheUse.REQUIRED
    sections = ("distill",)

    def __init__(self, model: nn.Module, kind: str, teacher_dim: int, cfg: DistillConfig) -> None:
        super().__init__(model)
        if kind not in BASELINES:
            raise ConfigError(f"unknown baseline {kind!r}; known: {BASELINES}")
        self.kind = kind
        self.cfg = cfg
        student_dim = int(model.visual.output_dim)
        if kind == "fd":
            self.kd_loss: nn.Module = FeatureDistillLoss(student_dim, teacher_dim)
        elif kind == "icl":
            self.kd_loss = InteractiveContrastiveLoss(student_dim, teacher_dim, own_scale=cfg.icl_own_scale)
        elif kind == "crd":
            self.kd_loss = ContrastiveRelationalLoss(temperature=cfg.crd_temperature)
        elif kind == "tinyclip_affinity":
            self.kd_loss = AffinityMimickingLoss()
        else:
            self.kd_loss = DistillClipLoss()
        # A buffer, so it follows the task to the device; fixed because the cache does not store it.
        self.register_buffer("teacher_logit_scale", torch.tensor(cfg.teacher_logit_scale), persistent=False)

    def distill(self, image: torch.Tensor, text: torch.Tensor, batch: dict) -> torch.Tensor:
        """The recipe's loss term on L2-normalised student embeddings and the batch's cached teacher rows."""
        t_img, t_txt = batch["teacher_image"], batch["teacher_text"]
        if self.kind == "fd":
            return self.kd_loss(image, text, t_img, t_txt)
        if self.kind == "icl":  # the student's CLIP scale, unless distill.icl_own_scale gives ICL its own
            return self.kd_loss(image, text, t_img, t_txt, self.model.logit_scale.exp())
        return self.kd_loss(image, text, t_img, t_txt, self.model.logit_scale.exp(), self.teacher_logit_scale)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        image, text = self.encode(batch)
        if self.kind == "openclip_distill":
            loss = self.distill(image, text, batch)  # CLIP loss + soft cross-entropy, in one
            clip = self.clip_loss(image, text, self.model.logit_scale.exp())  # its CLIP part, for the terms
            kd = loss - clip
            return {"loss": loss, "clip": clip.detach(), "kd": kd.detach(), "term/clip": clip, "term/kd": kd}
        clip = self.clip_loss(image, text, self.model.logit_scale.exp())
        kd = self.distill(image, text, batch)
        loss = clip + self.cfg.weight * kd
        terms = {"term/clip": clip, "term/kd": self.cfg.weight * kd}
        return {"loss": loss, "clip": clip.detach(), "kd": kd.detach(), **terms}

    def heads(self) -> dict[str, nn.Module]:
        """The learnt projections to teacher space (fd, icl); the other losses have no parameters."""
        return {"distill": self.kd_loss} if self.kind in _PROJECTED else {}

    @classmethod
    def from_config(cls, cfg: RunConfig, model: nn.Module, cache: TeacherCache | None) -> BaselineTask:
        """The baseline `train.method` with the cache's teacher width."""
        kind = cfg.train.method
        image_dim, text_dim = cache.meta.image_dim, cache.meta.text_dim
        if kind in _PROJECTED and image_dim != text_dim:
            raise ConfigError(
                f"train.method {kind} projects both towers to one teacher width, but the cache has "
                f"image {image_dim} and text {text_dim}"
            )
        return cls(model, kind, int(image_dim), cfg.distill)
