"""ComKD-CLIP (Chen et al., 2024; docs/methods.md): projector P, IFAlign, EduAttention and the
refinement KD.

The student has no text tower: `text_bank` is the teacher's L2-normalised class-name features
W_t [K, D] for every class, computed once. `teacher_image` is the teacher's L2-normalised image
feature u_t [B, D]; the student's feature arrives raw and goes through P.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    """P: lift the student's image feature into the teacher's space (Linear-GELU-Linear).

    `hidden` defaults to `out_dim`. `skip`, a linear map already into the teacher's space (a CID
    student's image projection), is added to the MLP, whose last layer then starts at zero: P
    begins as that map, so stage 2 starts from the student's own zero-shot classifier over W_t.
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden: int | None = None, skip: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        hidden = hidden or out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        self.skip = None
        if skip is not None:
            if tuple(skip.shape) != (out_dim, in_dim):
                raise ValueError(f"skip projection is {tuple(skip.shape)}, P maps {in_dim} -> {out_dim}")
            self.skip = nn.Linear(in_dim, out_dim, bias=False)
            with torch.no_grad():
                self.skip.weight.copy_(skip)
                self.net[-1].weight.zero_()
                self.net[-1].bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.skip(x) if self.skip is not None else self.net(x)


class IFAlignLoss(nn.Module):
    """Image feature alignment: `|μ(p) − μ(u_t)|_1 + |σ²(p) − σ²(u_t)|_1`, where μ and σ² are the
    per-dimension mean and variance over the batch, so the student matches how the teacher spreads
    its features rather than each sample.

    The L1 norms are averaged (not summed) over dimensions so the scale does not depend on width.
    σ² is the population variance (divide by B) over the local batch: finite for B = 1, and no
    gather under DDP (like unsynchronised BatchNorm).
    """

    def forward(self, projected_student: torch.Tensor, teacher_image: torch.Tensor) -> torch.Tensor:
        s_var, s_mean = torch.var_mean(projected_student, dim=0, correction=0)
        t_var, t_mean = torch.var_mean(teacher_image, dim=0, correction=0)
        return (s_mean - t_mean).abs().mean() + (s_var - t_var).abs().mean()


class EduAttention(nn.Module):
    """Educational attention: the projected student feature attends over the teacher's class-text
    features and adds what it reads, `f_e = p + α·FC(softmax(p·W_tᵀ / C)·W_t)`.

    α is a learnable scalar starting at 0, so training starts from the plain projected feature
    (PromptKD) and the text-fusion branch is blended in only as far as the loss asks for it.
    """

    def __init__(self, dim: int, attention_scale: float) -> None:
        super().__init__()
        self.attention_scale = attention_scale
        self.fc = nn.Linear(dim, dim)
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, p: torch.Tensor, text_bank: torch.Tensor) -> torch.Tensor:
        attention = (p @ text_bank.T / self.attention_scale).softmax(dim=-1)
        return p + self.alpha * self.fc(attention @ text_bank)


class RefinementKDLoss(nn.Module):
    """Refinement: the student's zero-shot class distribution over the teacher's text bank imitates
    the teacher's, `T²·KL(softmax(q_t/T) ‖ softmax(q_s/T))` averaged over the batch, with
    `q_s = τ⁻¹·norm(f_e)·W_tᵀ` and `q_t = τ⁻¹·u_t·W_tᵀ`.

    The T² factor keeps the gradient size independent of T (Hinton et al.). `logit_scale` is τ⁻¹,
    the teacher's exponentiated CLIP logit scale (100 for the released CLIP models).
    """

    def __init__(self, temperature: float = 1.0, logit_scale: float = 100.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.logit_scale = logit_scale

    def forward(
        self, f_e: torch.Tensor, teacher_image: torch.Tensor, text_bank: torch.Tensor
    ) -> torch.Tensor:
        q_s = self.logit_scale * F.normalize(f_e, dim=-1) @ text_bank.T
        q_t = self.logit_scale * teacher_image @ text_bank.T
        log_p_s = (q_s / self.temperature).log_softmax(dim=-1)
        log_p_t = (q_t / self.temperature).log_softmax(dim=-1)
        return self.temperature**2 * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
