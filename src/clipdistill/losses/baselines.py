"""Baseline distillation losses (docs/methods.md): CLIP-KD's FD, CRD and ICL, TinyCLIP's affinity
mimicking, and open_clip's `DistillClipLoss`.

Teacher embeddings come from a cache (detached), student embeddings are live; both arrive
L2-normalised. Batch-relational losses score local rows against global columns through
`contrastive_logits`, so under DDP the averaged gradient equals that of one process holding the
whole batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.losses.clip import contrastive_logits


def _soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy H(teacher, student) of each row, averaged over rows."""
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean()


def _kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of each row, averaged over rows (log-space targets for stability)."""
    return F.kl_div(
        student_logits.log_softmax(dim=1),
        teacher_logits.log_softmax(dim=1),
        reduction="batchmean",
        log_target=True,
    )


class Projection(nn.Module):
    """Map student embeddings to the teacher's width so the two can be compared directly.

    Bias-free so the origin (and hence cosine geometry) is kept; the identity when widths match.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        if student_dim == teacher_dim:
            self.proj: nn.Module = nn.Identity()
        else:
            self.proj = nn.Linear(student_dim, teacher_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class FeatureDistillLoss(nn.Module):
    """CLIP-KD feature distillation: pull each student embedding onto its teacher embedding.

    Element-wise MSE after projecting (one projection per modality) and re-normalising, so both
    sides lie on the unit sphere; the image and text terms are summed, as in CLIP-KD.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.image_proj = Projection(student_dim, teacher_dim)
        self.text_proj = Projection(student_dim, teacher_dim)

    def forward(
        self, s_img: torch.Tensor, s_txt: torch.Tensor, t_img: torch.Tensor, t_txt: torch.Tensor
    ) -> torch.Tensor:
        s_img = F.normalize(self.image_proj(s_img), dim=-1)
        s_txt = F.normalize(self.text_proj(s_txt), dim=-1)
        return F.mse_loss(s_img, t_img) + F.mse_loss(s_txt, t_txt)


class ContrastiveRelationalLoss(nn.Module):
    """CLIP-KD contrastive relational distillation: the student's in-batch image->text and
    text->image similarity distributions imitate the teacher's, via KL(teacher ‖ student).

    Each side uses its own logit scale; `temperature` further softens both, and the T² factor keeps
    the gradient size independent of it (Hinton et al.). The two directions are averaged.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(
        self,
        s_img: torch.Tensor,
        s_txt: torch.Tensor,
        t_img: torch.Tensor,
        t_txt: torch.Tensor,
        s_logit_scale: torch.Tensor,
        t_logit_scale: torch.Tensor,
    ) -> torch.Tensor:
        s_per_image, s_per_text, _ = contrastive_logits(s_img, s_txt, s_logit_scale / self.temperature)
        t_per_image, t_per_text, _ = contrastive_logits(t_img, t_txt, t_logit_scale / self.temperature)
        kl = _kl_divergence(s_per_image, t_per_image) + _kl_divergence(s_per_text, t_per_text)
        return self.temperature**2 * kl / 2


class InteractiveContrastiveLoss(nn.Module):
    """CLIP-KD interactive contrastive learning: the student's image must pick its caption among the
    teacher's texts, and the student's text its image among the teacher's images, which pulls the
    student into the teacher's embedding space.

    Student embeddings are projected to the teacher's width and re-normalised; the two directions
    are averaged. With `own_scale` the cross-modal logits get their own learnable scale, starting at
    1/0.07 (CLIP's parametrisation: exp of a learned log, used up to 100), as CLIP-KD's code gives ICL its
    own `cross_logit_scale`; otherwise the caller's scale (the student's CLIP scale) is used.
    """

    def __init__(self, student_dim: int, teacher_dim: int, own_scale: bool = False) -> None:
        super().__init__()
        self.image_proj = Projection(student_dim, teacher_dim)
        self.text_proj = Projection(student_dim, teacher_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07))) if own_scale else None

    def forward(
        self,
        s_img: torch.Tensor,
        s_txt: torch.Tensor,
        t_img: torch.Tensor,
        t_txt: torch.Tensor,
        logit_scale: torch.Tensor,
    ) -> torch.Tensor:
        if self.logit_scale is not None:
            logit_scale = self.logit_scale.clamp(max=math.log(100)).exp()  # CLIP's bound
        s_img = F.normalize(self.image_proj(s_img), dim=-1)
        s_txt = F.normalize(self.text_proj(s_txt), dim=-1)
        s_img_vs_t_txt, _, targets = contrastive_logits(s_img, t_txt, logit_scale)
        _, s_txt_vs_t_img, _ = contrastive_logits(t_img, s_txt, logit_scale)
        return (F.cross_entropy(s_img_vs_t_txt, targets) + F.cross_entropy(s_txt_vs_t_img, targets)) / 2


class AffinityMimickingLoss(nn.Module):
    """TinyCLIP affinity mimicking: cross-entropy of the student's image->text and text->image
    affinity rows against the teacher's softmax (soft targets); the two directions are averaged.

    Differs from CRD only by the teacher's entropy, a constant for the student.
    """

    def forward(
        self,
        s_img: torch.Tensor,
        s_txt: torch.Tensor,
        t_img: torch.Tensor,
        t_txt: torch.Tensor,
        s_logit_scale: torch.Tensor,
        t_logit_scale: torch.Tensor,
    ) -> torch.Tensor:
        s_per_image, s_per_text, _ = contrastive_logits(s_img, s_txt, s_logit_scale)
        t_per_image, t_per_text, _ = contrastive_logits(t_img, t_txt, t_logit_scale)
        return (
            _soft_cross_entropy(s_per_image, t_per_image) + _soft_cross_entropy(s_per_text, t_per_text)
        ) / 2


class DistillClipLoss(nn.Module):
    """open_clip's `DistillClipLoss` as one scalar: the student's own CLIP loss plus the soft
    cross-entropy of its logits against the teacher's (both averaged over the two directions).

    Unlike the other baselines it already contains the contrastive task loss.
    """

    def forward(
        self,
        s_img: torch.Tensor,
        s_txt: torch.Tensor,
        t_img: torch.Tensor,
        t_txt: torch.Tensor,
        s_logit_scale: torch.Tensor,
        t_logit_scale: torch.Tensor,
    ) -> torch.Tensor:
        s_per_image, s_per_text, targets = contrastive_logits(s_img, s_txt, s_logit_scale)
        t_per_image, t_per_text, _ = contrastive_logits(t_img, t_txt, t_logit_scale)
        contrastive = (F.cross_entropy(s_per_image, targets) + F.cross_entropy(s_per_text, targets)) / 2
        distill = (
            _soft_cross_entropy(s_per_image, t_per_image) + _soft_cross_entropy(s_per_text, t_per_text)
        ) / 2
        return contrastive + distill
