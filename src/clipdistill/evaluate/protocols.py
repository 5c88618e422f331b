"""ComKD's evaluation protocols (DESIGN 4): base-to-novel and domain generalisation.

Base-to-novel follows CoOp/PromptKD: the classes are split in two by a seeded draw; base accuracy
is measured on base-class test images with logits over the base classes only, novel accuracy
likewise on the novel classes, and HM is their harmonic mean. Domain generalisation scores the
same classifier on test images shifted by real image transforms.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms.functional as TF


def base_novel_split(
    n_classes: int, base_fraction: float = 0.5, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Sorted (base, novel) class ids: a seeded draw of round(fraction·K) base classes."""
    n_base = int(round(base_fraction * n_classes))
    if not 0 < n_base < n_classes:
        raise ValueError(f"base_fraction {base_fraction} leaves no base or no novel class of {n_classes}")
    order = np.random.default_rng(seed).permutation(n_classes)
    return sorted(order[:n_base].tolist()), sorted(order[n_base:].tolist())


def subset_accuracy(logits: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> float:
    """Top-1 accuracy (percent) on the images of `classes`, choosing among `classes` only."""
    classes_t = torch.tensor(classes, device=logits.device)
    labels = labels.to(logits.device)
    rows = torch.isin(labels, classes_t)
    pred = classes_t[logits[rows][:, classes_t].argmax(dim=1)]
    return 100.0 * (pred == labels[rows]).float().mean().item()


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def base_to_novel(logits: torch.Tensor, labels: torch.Tensor, base: list[int], novel: list[int]) -> dict:
    """`base_acc`, `novel_acc` and their harmonic mean `hm`, in percent."""
    base_acc, novel_acc = subset_accuracy(logits, labels, base), subset_accuracy(logits, labels, novel)
    return {"base_acc": base_acc, "novel_acc": novel_acc, "hm": harmonic_mean(base_acc, novel_acc)}


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


def domain_shift(
    logits_of: Callable[[Callable[[torch.Tensor], torch.Tensor]], torch.Tensor], labels: torch.Tensor
) -> dict:
    """Top-1 accuracy per shifted domain (`domain_<name>`) and their mean `domain_shift_avg`.

    `logits_of(transform)` returns the test logits [N, K] with `transform` applied to the pixels.
    """
    out = {}
    for name, shift in DOMAIN_SHIFTS.items():
        pred = logits_of(shift).argmax(dim=1).cpu()
        out[f"domain_{name}"] = 100.0 * (pred == labels).float().mean().item()
    out["domain_shift_avg"] = float(np.mean(list(out.values())))
    return out
