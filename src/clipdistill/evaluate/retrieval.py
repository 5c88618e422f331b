"""Image-text retrieval recall@k from precomputed features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _recall_at_k(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    query_keys: torch.Tensor,
    gallery_keys: torch.Tensor,
    ks: Sequence[int],
    batch_size: int,
) -> dict[int, float]:
    """Percent of queries with a gallery item of the same key among their top k.

    One helper serves both rules: the key is the image index for the instance rule and the class
    for the class rule. Scoring one batch of queries at a time keeps memory at O(batch x gallery).
    """
    max_k = min(max(ks), gallery.shape[0])
    hits = {k: 0 for k in ks}
    for start in range(0, queries.shape[0], batch_size):
        scores = queries[start : start + batch_size] @ gallery.T
        top = scores.topk(max_k, dim=1).indices
        match = gallery_keys[top] == query_keys[start : start + batch_size, None]
        for k in ks:
            hits[k] += int(match[:, :k].any(dim=1).sum())
    return {k: 100.0 * n / queries.shape[0] for k, n in hits.items()}


@torch.no_grad()
def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor | None = None,
    image_labels: torch.Tensor | None = None,
    text_labels: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
    batch_size: int = 1024,
) -> dict:
    """Text->image (`image_retrieval_recall@k`) and image->text (`text_retrieval_recall@k`) recall, percent.

    Two rules, reported under "rule":
    - "instance" (give `text_to_image`, the image index of each text): CLIP_benchmark's rule, a hit
      when a text's own image, or any of an image's own texts, is in the top k.
    - "class" (give `image_labels` and `text_labels`): a hit when any top-k item shares the query's
      class; needed where captions repeat across images, so the exact pair is not identifiable.
    Features are L2-normalised here, so scores are cosine similarities.
    """
    if (
        image_features.ndim != 2
        or text_features.ndim != 2
        or image_features.shape[1] != text_features.shape[1]
        or 0 in (image_features.shape[0], text_features.shape[0])
    ):
        raise ValueError(
            f"expected non-empty [N, D] image and [M, D] text features, got {tuple(image_features.shape)} "
            f"and {tuple(text_features.shape)}"
        )
    if (text_to_image is None) == (image_labels is None and text_labels is None):
        raise ValueError(
            "give either text_to_image (instance rule) or image_labels and text_labels (class rule)"
        )
    num_images, num_texts = image_features.shape[0], text_features.shape[0]

    device = image_features.device
    if text_to_image is not None:
        rule = "instance"
        if text_to_image.shape != (num_texts,):
            raise ValueError(
                f"text_to_image must have shape ({num_texts},), got {tuple(text_to_image.shape)}"
            )
        if not 0 <= int(text_to_image.min()) <= int(text_to_image.max()) < num_images:
            raise ValueError(f"text_to_image values must index the {num_images} images")
        image_keys = torch.arange(num_images, device=device)
        text_keys = text_to_image.to(device)
    else:
        rule = "class"
        if image_labels is None or text_labels is None:
            raise ValueError("the class rule needs both image_labels and text_labels")
        if image_labels.shape != (num_images,) or text_labels.shape != (num_texts,):
            raise ValueError(
                f"labels must have shapes ({num_images},) and ({num_texts},), "
                f"got {tuple(image_labels.shape)} and {tuple(text_labels.shape)}"
            )
        image_keys, text_keys = image_labels.to(device), text_labels.to(device)

    images = F.normalize(image_features.float(), dim=-1)
    texts = F.normalize(text_features.float(), dim=-1).to(device)
    text_to_image_recall = _recall_at_k(texts, images, text_keys, image_keys, ks, batch_size)
    image_to_text_recall = _recall_at_k(images, texts, image_keys, text_keys, ks, batch_size)
    metrics: dict = {"rule": rule}
    metrics.update({f"image_retrieval_recall@{k}": r for k, r in text_to_image_recall.items()})
    metrics.update({f"text_retrieval_recall@{k}": r for k, r in image_to_text_recall.items()})
    return metrics
