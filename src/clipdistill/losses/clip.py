"""The CLIP contrastive loss, gathered across ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipdistill.distributed import all_gather_with_grad, rank


def contrastive_logits(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local rows against the global batch: returns (image->text, text->image, targets).

    With DDP each rank scores its own rows against every rank's columns, so the summed
    gradient equals that of one process holding the whole global batch.
    """
    all_image = all_gather_with_grad(image)
    all_text = all_gather_with_grad(text)
    logits_per_image = logit_scale * image @ all_text.T
    logits_per_text = logit_scale * text @ all_image.T
    offset = rank() * image.shape[0]
    targets = torch.arange(image.shape[0], device=image.device) + offset
    return logits_per_image, logits_per_text, targets


class ClipLoss(nn.Module):
    """Symmetric InfoNCE between paired image and text embeddings (L2-normalised)."""

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        logits_i, logits_t, targets = contrastive_logits(image, text, logit_scale)
        return (F.cross_entropy(logits_i, targets) + F.cross_entropy(logits_t, targets)) / 2
