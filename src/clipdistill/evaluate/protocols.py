"""ComKD's evaluation protocols (docs/methods.md): base-to-novel and domain generalisation.

Base-to-novel follows CoOp/PromptKD: the classes are split in two by a seeded draw; base accuracy
is measured on base-class test images with logits over the base classes only, novel accuracy
likewise on the novel classes, and HM is their harmonic mean. Domain generalisation scores the
same classifier on test images shifted by real image transforms.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from clipdistill.data.shifts import DOMAIN_SHIFTS


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


def domain_shift(
    logits_of: Callable[[Callable[[torch.Tensor], torch.Tensor]], torch.Tensor],
    labels: torch.Tensor,
    skip: str = "",
) -> dict:
    """Top-1 accuracy per shifted domain (`domain_<name>`) and their mean `domain_shift_avg`.

    `logits_of(transform)` returns the test logits [N, K] with `transform` applied to the pixels.
    `skip` leaves one shift out: a model distilled on that domain is scored on the others.
    """
    out = {}
    for name, shift in DOMAIN_SHIFTS.items():
        if name == skip:
            continue
        pred = logits_of(shift).argmax(dim=1).cpu()
        out[f"domain_{name}"] = 100.0 * (pred == labels).float().mean().item()
    out["domain_shift_avg"] = float(np.mean(list(out.values())))
    return out
