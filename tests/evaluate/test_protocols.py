"""ComKD's protocols: the base/novel split, base/novel/HM from logits, and the domain shifts."""

from __future__ import annotations

import pytest
import torch

from clipdistill.data.shifts import DOMAIN_SHIFTS
from clipdistill.data.splits import base_novel_split
from clipdistill.evaluate.protocols import base_to_novel, domain_shift, harmonic_mean, subset_accuracy


def test_split_is_seeded_disjoint_and_complete():
    base, novel = base_novel_split(10, 0.5, seed=0)
    assert len(base) == len(novel) == 5 and sorted(base + novel) == list(range(10))
    assert (base, novel) == base_novel_split(10, 0.5, seed=0)
    assert base != base_novel_split(10, 0.5, seed=1)[0]
    assert len(base_novel_split(10, 0.3)[0]) == 3
    with pytest.raises(ValueError):
        base_novel_split(10, 0.0)


def test_base_and_novel_choose_within_their_own_classes():
    # 4 classes, base {0, 1}, novel {2, 3}. Image 0 (class 0) scores class 2 highest overall, but
    # among base classes class 0 wins: correct for base accuracy, as in CoOp.
    logits = torch.tensor(
        [
            [0.5, 0.1, 0.9, 0.0],  # label 0: base-correct
            [0.6, 0.2, 0.0, 0.0],  # label 1: base-wrong
            [0.0, 0.0, 0.3, 0.1],  # label 2: novel-correct
            [0.9, 0.0, 0.1, 0.2],  # label 3: novel-correct
        ]
    )
    labels = torch.tensor([0, 1, 2, 3])
    assert subset_accuracy(logits, labels, [0, 1]) == pytest.approx(50.0)
    assert subset_accuracy(logits, labels, [2, 3]) == pytest.approx(100.0)
    out = base_to_novel(logits, labels, [0, 1], [2, 3])
    assert out["base_acc"] == pytest.approx(50.0) and out["novel_acc"] == pytest.approx(100.0)
    assert out["hm"] == pytest.approx(2 * 50 * 100 / 150)  # 66.67
    assert harmonic_mean(0.0, 80.0) == 0.0 and harmonic_mean(0.0, 0.0) == 0.0


def test_domain_shifts_keep_the_shape_and_change_the_images():
    x = torch.rand(3, 3, 32, 32)
    x[:, :, :16] = 0.0  # not rotation- or blur-invariant
    for name, shift in DOMAIN_SHIFTS.items():
        y = shift(x)
        assert y.shape == x.shape and y.dtype == x.dtype, name
        assert not torch.allclose(y, x), name
        assert 0.0 <= y.min() and y.max() <= 1.0, name
    assert torch.equal(DOMAIN_SHIFTS["noise"](x), DOMAIN_SHIFTS["noise"](x))  # a fixed test set


def test_domain_shift_columns_and_average():
    labels = torch.tensor([0, 1, 1, 0])
    perfect = torch.nn.functional.one_hot(labels, 2).float()

    def logits_of(shift):
        return perfect if shift is DOMAIN_SHIFTS["inverted"] else perfect.flip(1)

    out = domain_shift(logits_of, labels)
    assert set(out) == {f"domain_{n}" for n in DOMAIN_SHIFTS} | {"domain_shift_avg"}
    assert out["domain_inverted"] == 100.0 and out["domain_noise"] == 0.0
    assert out["domain_shift_avg"] == pytest.approx(100.0 / len(DOMAIN_SHIFTS))


def test_domain_shift_leaves_out_the_target_domain():
    labels = torch.tensor([0, 1])
    seen = []

    def logits_of(shift):
        seen.append(shift)
        return torch.nn.functional.one_hot(labels, 2).float()

    out = domain_shift(logits_of, labels, skip="low_contrast")
    assert "domain_low_contrast" not in out and len(seen) == len(DOMAIN_SHIFTS) - 1
    assert DOMAIN_SHIFTS["low_contrast"] not in seen and out["domain_shift_avg"] == 100.0


def test_cli_protocol_flag_sets_eval_protocol(capsys):
    from clipdistill.cli import main

    assert main(["eval", "--protocol", "domain", "--print-config"]) == 0
    assert "protocol: domain" in capsys.readouterr().out
