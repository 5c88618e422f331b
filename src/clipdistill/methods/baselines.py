"""The distillation baselines (docs/methods.md) as recipes on the shared trainer.

Each is L = w_clip·L_clip(student) + λ·L_kd with L_kd one loss of `clipdistill.losses.baselines`,
fed the cached teacher rows of the batch (the teacher never runs here). open_clip's `DistillClipLoss`
already contains the student's CLIP loss, so that recipe uses it alone. The `distill` keys left unset
take each method's origin settings (`config.BASELINE_ORIGINS`).
"""

from __future__ import annotations

import torch
from torch import nn

from clipdistill.cache import TeacherCache
from clipdistill.config import ConfigError, DistillConfig, RunConfig, config_from_dict
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
    """One baseline recipe; `kind` picks the distillation loss. Logs `clip` and `kd` parts (unweighted).

    For openclip_distill `kd` is its soft cross-entropy (the loss minus the CLIP part) and
    `distill.weight` and `distill.clip_weight` do not apply: open_clip's recipe has no weight.
    """

    cache_use = CacheUse.REQUIRED
    sections = ("distill",)

    def __init__(
        self, model: nn.Module, kind: str, teacher_dim: int, cfg: DistillConfig, teacher_scale: float = 100.0
    ) -> None:
        super().__init__(model)
        if kind not in BASELINES:
            raise ConfigError(f"unknown baseline {kind!r}; known: {BASELINES}")
        self.kind = kind
        self.cfg = cfg = cfg.for_method(kind)
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
        if not self._reads_student_scale():  # no term reads it: frozen, so DDP sees no unused parameter
            model.logit_scale.requires_grad_(False)
        # the teacher's logit scale as `from_config` resolves it; a buffer: it follows the task to the device
        self.register_buffer("teacher_logit_scale", torch.tensor(teacher_scale), persistent=False)

    def _reads_student_scale(self) -> bool:
        """Whether a term of the loss uses the student's learnable logit scale."""
        if self.cfg.clip_weight != 0 or self.kind in ("crd", "openclip_distill"):
            return True
        if self.kind == "icl":
            return not self.cfg.icl_own_scale
        return self.kind == "tinyclip_affinity" and self.cfg.affinity_logit_scale == 0

    def distill(self, image: torch.Tensor, text: torch.Tensor, batch: dict) -> torch.Tensor:
        """The recipe's loss term on L2-normalised student embeddings and the batch's cached teacher rows."""
        t_img, t_txt = batch["teacher_image"], batch["teacher_text"]
        if self.kind == "fd":
            return self.kd_loss(image, text, t_img, t_txt)
        if self.kind == "icl":  # the student's CLIP scale, unless distill.icl_own_scale gives ICL its own
            return self.kd_loss(image, text, t_img, t_txt, self.model.logit_scale.exp())
        student_scale, teacher_scale = self.model.logit_scale.exp(), self.teacher_logit_scale
        if self.kind == "tinyclip_affinity" and self.cfg.affinity_logit_scale > 0:  # TinyCLIP's --logit-scale
            student_scale = teacher_scale = torch.full_like(teacher_scale, self.cfg.affinity_logit_scale)
        return self.kd_loss(image, text, t_img, t_txt, student_scale, teacher_scale)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        image, text = self.encode(batch)
        if self.kind == "openclip_distill":
            loss = self.distill(image, text, batch)  # CLIP loss + soft cross-entropy, in one
            clip = self.clip_loss(image, text, self.model.logit_scale.exp())  # its CLIP part, for the terms
            kd = loss - clip
            return {"loss": loss, "clip": clip.detach(), "kd": kd.detach(), "term/clip": clip, "term/kd": kd}
        clip = self.clip_loss(image, text, self.model.logit_scale.exp())
        kd = self.distill(image, text, batch)
        terms = {"term/kd": self.cfg.weight * kd}
        if self.cfg.clip_weight != 0:  # TinyCLIP's recipe drops it: then no term, no gradient
            terms["term/clip"] = self.cfg.clip_weight * clip
        loss = sum(terms.values())
        return {"loss": loss, "clip": clip.detach(), "kd": kd.detach(), **terms}

    def heads(self) -> dict[str, nn.Module]:
        """The learnt projections to teacher space (fd, icl); the other losses have no parameters."""
        return {"distill": self.kd_loss} if self.kind in _PROJECTED else {}

    @classmethod
    def unread_keys(cls, method: str, values: dict) -> dict[str, dict[str, object]]:
        """The teacher's logit scale where no term reads it (fd, icl, TinyCLIP at its own fixed scale),
        pinned at 100, the default every such run recorded before the default became the teacher's own."""
        if reads_teacher_logits(method, config_from_dict(values.get("distill", {}), DistillConfig)):
            return {}
        return {"distill": {"teacher_logit_scale": 100.0}}

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
        scale = 100.0  # a placeholder where no term reads it
        if reads_teacher_logits(kind, cfg.distill):
            scale = teacher_scale(cfg.distill.teacher_logit_scale, cache)
        return cls(model, kind, int(image_dim), cfg.distill, scale)


def reads_teacher_logits(kind: str, cfg: DistillConfig) -> bool:
    """Whether baseline `kind` scales the teacher's similarities by the teacher's logit scale (TinyCLIP's
    recipe by its own fixed scale instead, unless `affinity_logit_scale` is 0)."""
    if kind == "tinyclip_affinity":
        return cfg.for_method(kind).affinity_logit_scale == 0
    return kind in ("crd", "openclip_distill")


def teacher_scale(configured: float, cache: TeacherCache, key: str = "distill.teacher_logit_scale") -> float:
    """`configured`, or for 0 the teacher's own logit scale recorded in the cache; refuses a cache that
    records none rather than guess one."""
    if configured:
        return configured
    own = cache.logit_scale  # read from the cache's files
    if own is None:
        raise ConfigError(
            f"{key} 0 takes the teacher's own logit scale, but the cache at {cache.folder} records none "
            "(a teacher without one, or a cache older than teacher.json): rerun `clipdistill embed` to "
            f"record it, or set --{key} (100 is the released CLIP models' value)"
        )
    return own
