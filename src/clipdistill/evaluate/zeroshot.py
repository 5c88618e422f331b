"""Zero-shot classification from precomputed features, following CLIP's prompt-ensemble recipe."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def predict_with_classifier(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Cosine logits [N, C]; image features are normalised here so callers can pass raw encoder output."""
    return F.normalize(image_features.float(), dim=-1) @ classifier.to(image_features.device, torch.float32)


@torch.no_grad()
def zeroshot_accuracy(
    image_features: torch.Tensor,
    labels: torch.Tensor,
    classifier: torch.Tensor,
    topk: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Top-k accuracies (`acc{k}`) and mean per-class recall, all in percent.

    k is capped at the number of classes, so acc5 on a 3-class task is 100. Mean per-class recall
    averages over the classes present in `labels` (like sklearn's balanced accuracy), which is the
    fair number on imbalanced test sets.
    """
    logits = predict_with_classifier(image_features, classifier)
    labels = labels.to(logits.device)
    num_classes = logits.shape[1]
    ranked = logits.topk(min(max(topk), num_classes), dim=1).indices
    hits = ranked == labels[:, None]
    metrics = {f"acc{k}": 100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in topk}
    correct = hits[:, 0].float()
    present = labels.unique()
    recalls = torch.stack([correct[labels == c].mean() for c in present])
    metrics["mean_per_class_recall"] = 100.0 * recalls.mean().item()
    return metrics
