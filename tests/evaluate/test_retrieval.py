import pytest
import torch

from clipdistill.evaluate.retrieval import retrieval_recall

# One-hot images make text->image scores the rows of S and image->text scores its columns.
# Rows have unit norm, so the cosine similarities are exactly these numbers.
S_INSTANCE = torch.tensor(
    [
        [0.8, 0.6, 0.0],  # text 0, image 0: ranked 1st
        [0.6, 0.8, 0.0],  # text 1, image 0: ranked 2nd
        [0.0, 0.28, 0.96],  # text 2, image 1: ranked 2nd
        [0.0, 0.96, 0.28],  # text 3, image 2: ranked 2nd
    ]
)
# image 0 (texts 0, 1): text 0 ranked 1st; image 1 (text 2): column [.6, .8, .28, .96], ranked 4th;
# image 2 (text 3): column [0, 0, .96, .28], ranked 2nd.
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 2])


def test_instance_rule_hand_built():
    # Rescaling must not matter: features are normalised before scoring.
    images = torch.diag(torch.tensor([5.0, 1.0, 0.5]))
    texts = S_INSTANCE * torch.tensor([[1.0], [3.0], [10.0], [1.0]])

    metrics = retrieval_recall(images, texts, text_to_image=TEXT_TO_IMAGE, ks=(1, 2, 5))

    assert metrics["rule"] == "instance"
    assert metrics["image_retrieval_recall@1"] == pytest.approx(25.0)
    assert metrics["image_retrieval_recall@2"] == pytest.approx(100.0)
    assert metrics["image_retrieval_recall@5"] == pytest.approx(100.0)
    assert metrics["text_retrieval_recall@1"] == pytest.approx(100 / 3)
    assert metrics["text_retrieval_recall@2"] == pytest.approx(200 / 3)
    assert metrics["text_retrieval_recall@5"] == pytest.approx(100.0)


def test_class_rule_hand_built():
    images = torch.eye(4)
    image_labels = torch.tensor([0, 0, 1, 1])
    texts = torch.tensor(
        [
            [0.48, 0.0, 0.64, 0.6],  # class 0: images 2, 3 (class 1) first, image 0 3rd
            [0.0, 0.6, 0.8, 0.0],  # class 1: image 2 (class 1) first
        ]
    )
    text_labels = torch.tensor([0, 1])
    # image->text: images 0 and 2 find their class first, images 1 and 3 second.

    metrics = retrieval_recall(
        images, texts, image_labels=image_labels, text_labels=text_labels, ks=(1, 2, 3)
    )

    assert metrics == pytest.approx(
        {
            "rule": "class",
            "image_retrieval_recall@1": 50.0,
            "image_retrieval_recall@2": 50.0,
            "image_retrieval_recall@3": 100.0,
            "text_retrieval_recall@1": 50.0,
            "text_retrieval_recall@2": 100.0,
            "text_retrieval_recall@3": 100.0,
        }
    )


def _reference_instance_recall(images, texts, text_to_image, ks):
    """Rank-based reference: a hit at k when fewer than k gallery items score strictly higher."""
    images = torch.nn.functional.normalize(images, dim=-1)
    texts = torch.nn.functional.normalize(texts, dim=-1)
    scores = texts @ images.T  # [M, N]
    own = scores[torch.arange(len(texts)), text_to_image]
    text_rank = (scores > own[:, None]).sum(dim=1)
    image_rank = torch.stack(
        [
            (scores[:, i][None, :] > scores[text_to_image == i, i][:, None]).sum(dim=1).min()
            for i in range(len(images))
        ]
    )
    out = {f"image_retrieval_recall@{k}": 100.0 * (text_rank < k).float().mean().item() for k in ks}
    out.update({f"text_retrieval_recall@{k}": 100.0 * (image_rank < k).float().mean().item() for k in ks})
    return out


def test_instance_rule_matches_reference_and_batching_is_invisible():
    torch.manual_seed(0)
    images, texts = torch.randn(40, 16), torch.randn(100, 16)
    text_to_image = torch.cat([torch.arange(40), torch.randint(40, (60,))])  # every image has a caption
    ks = (1, 5, 10)

    one_batch = retrieval_recall(images, texts, text_to_image=text_to_image, ks=ks)
    batched = retrieval_recall(images, texts, text_to_image=text_to_image, ks=ks, batch_size=7)

    assert one_batch == batched
    assert one_batch == pytest.approx(
        {"rule": "instance", **_reference_instance_recall(images, texts, text_to_image, ks)}
    )
    assert one_batch["image_retrieval_recall@1"] < one_batch["image_retrieval_recall@10"]


def test_class_rule_batching_is_invisible():
    torch.manual_seed(1)
    images, texts = torch.randn(50, 8), torch.randn(30, 8)
    labels = {"image_labels": torch.randint(5, (50,)), "text_labels": torch.randint(5, (30,))}

    assert retrieval_recall(images, texts, **labels) == retrieval_recall(
        images, texts, **labels, batch_size=4
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "either"),
        (
            {"text_to_image": TEXT_TO_IMAGE, "image_labels": torch.zeros(3), "text_labels": torch.zeros(4)},
            "either",
        ),
        ({"image_labels": torch.zeros(3)}, "both"),
        ({"text_to_image": torch.tensor([0, 0, 1])}, "shape"),
        ({"text_to_image": torch.tensor([0, 0, 1, 3])}, "index"),
        ({"image_labels": torch.zeros(3), "text_labels": torch.zeros(5)}, "shapes"),
    ],
)
def test_bad_rule_inputs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        retrieval_recall(torch.eye(3), S_INSTANCE, **kwargs)


def test_feature_dimension_mismatch_raises():
    with pytest.raises(ValueError, match="features"):
        retrieval_recall(torch.eye(3), torch.ones(4, 2), text_to_image=TEXT_TO_IMAGE)
