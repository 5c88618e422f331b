"""The base/novel class split of ComKD's protocols (CoOp, PromptKD): base classes are labelled in
stage 1 and scored apart from the novel ones."""

from __future__ import annotations

import numpy as np


def base_novel_split(
    n_classes: int, base_fraction: float = 0.5, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Sorted (base, novel) class ids: a seeded draw of round(fraction·K) base classes."""
    n_base = int(round(base_fraction * n_classes))
    if not 0 < n_base < n_classes:
        raise ValueError(f"base_fraction {base_fraction} leaves no base or no novel class of {n_classes}")
    order = np.random.default_rng(seed).permutation(n_classes)
    return sorted(order[:n_base].tolist()), sorted(order[n_base:].tolist())
