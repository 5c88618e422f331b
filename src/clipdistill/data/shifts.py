"""Shifted image domains: the domain-generalisation test sets and the lab's cross-dataset target."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision.transforms.functional as TF


def _noise(x: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)  # the same shifted test set every time
    return (x + 0.2 * torch.randn(x.shape, generator=generator)).clamp(0, 1)


# Shifted domains of float pixels [B, 3, S, S] in [0, 1] (before the model's normalisation).
DOMAIN_SHIFTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "inverted": lambda x: 1.0 - x,
    "rotated": lambda x: TF.rotate(x, 90.0),
    "blurred": lambda x: TF.gaussian_blur(x, kernel_size=5, sigma=1.5),
    "low_contrast": lambda x: 0.5 + 0.3 * (x - 0.5),
    "noise": _noise,
}
