"""Zero-shot classification from precomputed features, following CLIP's prompt-ensemble recipe."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def zeroshot_classifier(
    encode_text: Callable[[list[str]], torch.Tensor],
    classnames: list[str],
    templates: list[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """Class weights [D, C]: per class, the re-normalised mean of its L2-normalised prompt embeddings.

    Normalising each prompt before averaging keeps one long or odd template from dominating the
    ensemble; re-normalising makes the logits cosine similarities.
    """
    texts = [template.format(c=name) for name in classnames for template in templates]
    features = torch.cat(
        [
            F.normalize(encode_text(texts[i : i + batch_size]).float(), dim=-1)
            for i in range(0, len(texts), batch_size)
        ]
    )
    per_class = features.view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).T


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
