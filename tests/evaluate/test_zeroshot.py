import math

import pytest
import torch

from clipdistill.evaluate.zeroshot import predict_with_classifier, zeroshot_accuracy
from clipdistill.models.classifier import zeroshot_classifier

# Deliberately unnormalised: "the dog" is 10x longer than "a dog" and must not dominate its class.
PROMPT_VECTORS = {
    "a cat": [3.0, 4.0, 0.0],
    "the cat": [0.0, 0.0, 2.0],
    "a dog": [1.0, 0.0, 0.0],
    "the dog": [0.0, 10.0, 0.0],
}


def test_classifier_normalises_each_prompt_then_the_mean():
    calls = []

    def encode_text(texts):
        calls.append((list(texts), torch.is_grad_enabled()))
        return torch.tensor([PROMPT_VECTORS[t] for t in texts])

    classifier = zeroshot_classifier(encode_text, ["cat", "dog"], ["a {c}", "the {c}"], batch_size=3)

    # cat: mean([.6, .8, 0], [0, 0, 1]) = [.3, .4, .5]; dog: mean([1, 0, 0], [0, 1, 0]) = [.5, .5, 0]
    expected = torch.tensor([[0.3, 0.4, 0.5], [1.0, 1.0, 0.0]])
    expected = expected / expected.norm(dim=1, keepdim=True)
    assert classifier.shape == (3, 2)
    torch.testing.assert_close(classifier, expected.T)
    assert [len(texts) for texts, _ in calls] == [3, 1]
    assert sorted(t for texts, _ in calls for t in texts) == sorted(PROMPT_VECTORS)
    assert not any(grad for _, grad in calls)


def test_classifier_does_not_depend_on_batch_size():
    torch.manual_seed(0)
    table = {}

    def encode_text(texts):
        return torch.stack([table.setdefault(t, torch.randn(8)) for t in texts])

    names, templates = [f"class{i}" for i in range(5)], ["a {c}", "b {c}", "c {c}"]
    one_batch = zeroshot_classifier(encode_text, names, templates)
    small_batches = zeroshot_classifier(encode_text, names, templates, batch_size=2)
    torch.testing.assert_close(one_batch, small_batches)
    torch.testing.assert_close(one_batch.norm(dim=0), torch.ones(5))


def test_predict_returns_cosine_logits():
    logits = predict_with_classifier(torch.tensor([[2.0, 1.0, 0.0]]), torch.eye(3))
    torch.testing.assert_close(logits, torch.tensor([[2.0, 1.0, 0.0]]) / math.sqrt(5))


def test_accuracy_on_hand_built_case_with_three_classes():
    classifier = torch.eye(3)  # logits are the (normalised) feature coordinates
    features = torch.tensor(
        [
            [2.0, 1.0, 0.0],  # label 0, ranked 1st
            [1.0, 0.0, 0.5],  # label 2, ranked 2nd
            [0.0, 3.0, 1.0],  # label 1, ranked 1st
            [0.0, 0.0, 5.0],  # label 2, ranked 1st
            [1.0, 0.5, 0.0],  # label 2, ranked 3rd
        ]
    )
    labels = torch.tensor([0, 2, 1, 2, 2])

    metrics = zeroshot_accuracy(features, labels, classifier, topk=(1, 2, 5))

    assert metrics["acc1"] == pytest.approx(60.0)
    assert metrics["acc2"] == pytest.approx(80.0)
    assert metrics["acc5"] == pytest.approx(100.0)  # k capped at C = 3
    # per-class top-1 recall: class 0 1/1, class 1 1/1, class 2 1/3
    assert metrics["mean_per_class_recall"] == pytest.approx(100.0 * (1 + 1 + 1 / 3) / 3)


def test_accuracy_default_keys():
    metrics = zeroshot_accuracy(torch.eye(3), torch.tensor([0, 2, 1]), torch.eye(3))
    assert metrics == pytest.approx({"acc1": 100 / 3, "acc5": 100.0, "mean_per_class_recall": 100 / 3})
