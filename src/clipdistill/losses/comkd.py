"""ComKD-CLIP (Chen et al., 2024; docs/methods.md): projector P, IFAlign, EduAttention and the
refinement KD.

The student has no text tower: `text_bank` is the teacher's L2-normalised class-name features
W_t [K, D] for every class, computed once. `teacher_image` is the teacher's L2-normalised image
feature u_t [B, D]; the student's feature arrives raw and goes through P.
"""

from __future__ import annotations

import math

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

    `reduction` "sum" is the formula's L1 norms (summed over the D dimensions); "mean" divides them by
    D, so the scale does not depend on width (and its gradient is D times smaller).
    σ² is the population variance (divide by B) over the local batch: finite for B = 1, and no
    gather under DDP (like unsynchronised BatchNorm).
    """

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"IFAlign reduction must be mean or sum, not {reduction!r}")
        self.reduction = reduction

    def forward(self, projected_student: torch.Tensor, teacher_image: torch.Tensor) -> torch.Tensor:
        s_var, s_mean = torch.var_mean(projected_student, dim=0, correction=0)
        t_var, t_mean = torch.var_mean(teacher_image, dim=0, correction=0)
        distance = (s_mean - t_mean).abs() + (s_var - t_var).abs()
        return distance.sum() if self.reduction == "sum" else distance.mean()


def relative_entropy(attention: torch.Tensor) -> torch.Tensor:
    """Mean entropy of attention rows over K classes, divided by log K: 1 = uniform, 0 = one class."""
    k = attention.shape[-1]
    entropy = -(attention * attention.clamp_min(1e-12).log()).sum(dim=-1)
    return entropy.mean() / math.log(k) if k > 1 else entropy.mean() * 0


class EduAttention(nn.Module):
    """Educational attention, `mean_text`: the projected student feature attends over the teacher's
    class-text features themselves and adds what it reads, `f_e = p + α·FC(softmax(p·W_tᵀ / C)·W_t)`.

    With C = 1 on unit vectors the logits lie in [-1, 1], so the attention is near uniform and reads
    about the mean class feature. α is a learnable scalar starting at 0, so training starts from the
    plain projected feature (PromptKD).
    """

    def __init__(self, dim: int, attention_scale: float) -> None:
        super().__init__()
        self.attention_scale = attention_scale
        self.fc = nn.Linear(dim, dim)
        self.alpha = nn.Parameter(torch.zeros(()))

    def attend(self, p: torch.Tensor, text_bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_e [B, D], the attention [B, 1, K])."""
        attention = (p @ text_bank.T / self.attention_scale).softmax(dim=-1)
        return p + self.alpha * self.fc(attention @ text_bank), attention.unsqueeze(1)

    def forward(self, p: torch.Tensor, text_bank: torch.Tensor) -> torch.Tensor:
        return self.attend(p, text_bank)[0]


class CrossEduAttention(nn.Module):
    """Educational attention, `cross`: a cross-attention from the student's image feature to the
    teacher's class texts, `f_e = p + α·FC(softmax(Q·Kᵀ / τ)·V)` with `Q = p·W_q`, `K = W_t·W_k`,
    `V = W_t·W_v`, split into `heads` heads of D / heads dimensions.

    Q and K are L2-normalised per head and divided by a learned temperature τ (CLIP's
    parametrisation, starting at `temperature`; `clamp_temperature` keeps it at least 0.01), so the
    attention is selective from the first step. W_q, W_k and W_v start at the identity: at step 0
    each head's attention is the student's zero-shot class distribution on its slice of dimensions,
    and the branch reads the text features of the classes the image resembles. α starts at 0.1,
    not 0: at 0 the branch's own
    weights get no gradient until α has moved.
    """

    ALPHA_INIT = 0.1
    MAX_LOGIT_SCALE = math.log(100)

    def __init__(self, dim: int, heads: int = 1, temperature: float = 0.01) -> None:
        super().__init__()
        if heads < 1 or dim % heads:
            raise ValueError(f"comkd.attention_heads {heads} must be at least 1 and divide the width {dim}")
        if temperature <= 0:
            raise ValueError(f"comkd.attention_temperature must be positive, not {temperature}")
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        with torch.no_grad():
            for layer in (self.q, self.k, self.v):
                layer.weight.copy_(torch.eye(dim))
        self.fc = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))
        self.alpha = nn.Parameter(torch.tensor(self.ALPHA_INIT))

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        """Keep τ at least 0.01 (logit scale at most 100, CLIP's bound); called after each step."""
        self.logit_scale.clamp_(max=self.MAX_LOGIT_SCALE)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(0, 1)  # [heads, N, D / heads]

    def attend(self, p: torch.Tensor, text_bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_e [B, D], the attention [B, heads, K])."""
        q = F.normalize(self._split(self.q(p)), dim=-1)
        k = F.normalize(self._split(self.k(text_bank)), dim=-1)
        v = self._split(self.v(text_bank))
        attention = (self.logit_scale.exp() * q @ k.transpose(1, 2)).softmax(dim=-1)  # [heads, B, K]
        read = (attention @ v).transpose(0, 1).flatten(1)  # [B, D]
        return p + self.alpha * self.fc(read), attention.transpose(0, 1)

    def forward(self, p: torch.Tensor, text_bank: torch.Tensor) -> torch.Tensor:
        return self.attend(p, text_bank)[0]


class RefinementKDLoss(nn.Module):
    """Refinement: the student's zero-shot class distribution over the teacher's text bank imitates
    the teacher's, `T²·KL(softmax(q_t/T) ‖ softmax(q_s/T))`, with `q_s = τ⁻¹·norm(f_e)·W_tᵀ` and
    `q_t = τ⁻¹·u_t·W_tᵀ`.

    `reduction` "batchmean" sums over classes and averages over the batch; "promptkd" divides the
    sum by batch x classes, as PromptKD's code does (`sum · T² / numel(student_logits)`), so its
    KD weights (1000, 200) mean what they mean there. The T² factor keeps the gradient size
    independent of T (Hinton et al.). `logit_scale` is τ⁻¹, the teacher's exponentiated CLIP logit
    scale (100 for the released CLIP models).
    """

    def __init__(
        self, temperature: float = 1.0, logit_scale: float = 100.0, reduction: str = "batchmean"
    ) -> None:
        super().__init__()
        if reduction not in ("batchmean", "promptkd"):
            raise ValueError(f"KD reduction must be batchmean or promptkd, not {reduction!r}")
        self.temperature = temperature
        self.logit_scale = logit_scale
        self.reduction = reduction

    def forward(
        self, f_e: torch.Tensor, teacher_image: torch.Tensor, text_bank: torch.Tensor
    ) -> torch.Tensor:
        q_s = self.logit_scale * F.normalize(f_e, dim=-1) @ text_bank.T
        q_t = self.logit_scale * teacher_image @ text_bank.T
        log_p_s = (q_s / self.temperature).log_softmax(dim=-1)
        log_p_t = (q_t / self.temperature).log_softmax(dim=-1)
        if self.reduction == "promptkd":
            kl = F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True)
            return kl * self.temperature**2 / q_s.numel()
        return self.temperature**2 * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
