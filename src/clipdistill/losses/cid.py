"""CLIP-CID's two distillation losses (docs/methods.md): cluster and instance discrimination.

Gradient convention (the same as `ClipLoss`): autograd through the collectives sums every rank's
objective, so the local embeddings receive `world_size` times the gradient of the global-batch
mean, which DDP's gradient averaging turns back into exactly that gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn

from clipdistill.distributed import all_gather_with_grad, rank, world_size

_EPS = 1e-6


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0, without gradient (labels, teacher embeddings)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def _sharded_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy when each rank holds a slice of the classes (insightface's PartialFC).

    `labels[i]` is the column of row i's class in this rank's slice, or -1 when another rank holds
    it. The row maximum (for stability only, so detached) is all-reduced with MAX; the sum of
    exponentials and the target logit are all-reduced with SUM, with gradient.
    """
    row_max = logits.detach().max(dim=1).values
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
    sum_exp = dist_nn.all_reduce((logits - row_max[:, None]).exp().sum(dim=1))
    here = labels >= 0
    target = torch.where(here, logits.gather(1, labels.clamp_min(0)[:, None]).squeeze(1), 0.0)
    target = dist_nn.all_reduce(target)
    return (sum_exp.log() + row_max - target).mean()


class ClusterDiscriminationLoss(nn.Module):
    """ArcFace margin softmax of student embeddings over the teacher's k-means centroids.

    `L = -log e^{s·cos(θ_y+m)} / (e^{s·cos(θ_y+m)} + Σ_{j≠y} e^{s·cos θ_j})`, `cos θ_j = norm(z)·norm(C_j)`:
    the margin asks the student to sit closer to its cluster than the teacher's partition strictly
    needs, which transfers the teacher's semantic structure rather than one instance at a time.

    - `learnable`: prototypes are a Parameter initialised at the centroids, else a frozen buffer.
    - `sample_rate < 1` (PartialFC, training only): score every class that is a positive in the
      batch (global when sharded) plus random others, about `sample_rate·K` classes in all;
      labels are remapped into that subset.
    - `shard`: for K ~ 1M on many GPUs. Rank r holds the contiguous block of rows
      `[start_r, start_r + K_r)` (the first `K % world_size` ranks one row more); embeddings and
      labels are gathered, each rank scores the global batch against its block, and the softmax is
      combined across ranks. The loss is then the mean over the global batch (the same on every
      rank), and the prototype gradient is divided by `world_size` since DDP does not average it.
      Without `shard`, the loss is the mean over the local batch.
    """

    def __init__(
        self,
        centroids: torch.Tensor,
        scale: float = 32.0,
        margin: float = 0.2,
        learnable: bool = False,
        sample_rate: float = 1.0,
        shard: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.scale = scale
        self.margin = margin
        self.sample_rate = sample_rate
        self.shard = shard and world_size() > 1  # so build it after the process group is up
        num_classes = centroids.shape[0]
        self.class_start, num_local = 0, num_classes
        if self.shard:
            base, extra = divmod(num_classes, world_size())
            self.class_start = base * rank() + min(rank(), extra)
            num_local = base + (rank() < extra)
        local = centroids[self.class_start : self.class_start + num_local].detach().float().clone()
        if learnable:
            self.prototypes = nn.Parameter(local)
        else:
            self.register_buffer("prototypes", local)

    def sample(self, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Pick this rank's scored classes: (sorted local class indices, labels remapped into them).

        Remapped labels are -1 where the class lives on another rank. Without sampling (or in eval
        mode) every local class is scored and the index is None.
        """
        num_local = self.prototypes.shape[0]
        local = labels - self.class_start
        here = (local >= 0) & (local < num_local)
        local = torch.where(here, local, -1)
        if self.sample_rate >= 1.0 or not self.training:
            return None, local
        positives = local[here].unique()
        num_sample = max(int(self.sample_rate * num_local), positives.numel(), 1)
        score = torch.rand(num_local, device=labels.device)
        score[positives] = 2.0
        index = score.topk(num_sample).indices.sort().values
        local[here] = torch.searchsorted(index, local[here])
        return index, local

    def _cos_plus_margin(self, cos: torch.Tensor) -> torch.Tensor:
        """cos(θ+m) from cos θ; past θ = π - m, where cos(θ+m) would rise again, ArcFace's linear
        fallback `cos θ - m·sin m` keeps the target logit decreasing in θ."""
        cos_m, sin_m = math.cos(self.margin), math.sin(self.margin)
        cos_plus = cos * cos_m - (1.0 - cos**2).sqrt() * sin_m
        return torch.where(cos > math.cos(math.pi - self.margin), cos_plus, cos - self.margin * sin_m)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = F.normalize(z.float(), dim=-1)
        if self.shard:
            z, labels = all_gather_with_grad(z), _all_gather(labels)
        index, labels = self.sample(labels)
        weight = F.normalize(self.prototypes if index is None else self.prototypes[index], dim=-1)
        if self.shard and weight.requires_grad:
            weight.register_hook(lambda grad: grad / world_size())
        cos = (z @ weight.T).float().clamp(-1.0 + _EPS, 1.0 - _EPS)
        rows = (labels >= 0).nonzero().squeeze(1)
        cols = labels[rows]
        logits = self.scale * cos.index_put((rows, cols), self._cos_plus_margin(cos[rows, cols]))
        if self.shard:
            return _sharded_cross_entropy(logits, labels)
        return F.cross_entropy(logits, labels)


class InstanceDiscriminationLoss(nn.Module):
    """InfoNCE from student rows to the teacher embeddings of the whole (global) batch.

    Pairs: "ii" student image vs teacher image, "it" student image vs teacher text, "ti" student
    text vs teacher image; the target is the same instance, the mean over the chosen pairs is
    returned. Teacher embeddings are gathered without gradient so every rank's negatives are
    global. Inputs are L2-normalised and of the same width (the recipe projects the student).
    The temperature is fixed, or learnable through a log logit scale clamped at 100, as in CLIP.
    """

    PAIRS = ("ii", "it", "ti")

    def __init__(
        self,
        temperature: float = 0.07,
        learnable_temperature: bool = False,
        pairs: Sequence[str] = PAIRS,
    ) -> None:
        super().__init__()
        if not pairs or any(p not in self.PAIRS for p in pairs):
            raise ValueError(f"pairs must be a non-empty subset of {self.PAIRS}, got {pairs}")
        self.pairs = tuple(pairs)
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learnable_temperature:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)

    def forward(
        self,
        student_image: torch.Tensor,
        student_text: torch.Tensor,
        teacher_image: torch.Tensor,
        teacher_text: torch.Tensor,
    ) -> torch.Tensor:
        student = {"i": student_image, "t": student_text}
        teacher = {"i": _all_gather(teacher_image.detach()), "t": _all_gather(teacher_text.detach())}
        scale = self.log_logit_scale.exp().clamp(max=100.0)
        batch = student_image.shape[0]
        targets = torch.arange(batch, device=student_image.device) + rank() * batch
        losses = [
            F.cross_entropy(scale * student[s] @ teacher[t].T.to(student[s].dtype), targets)
            for s, t in self.pairs
        ]
        return torch.stack(losses).mean()
