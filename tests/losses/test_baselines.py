"""Baseline distillation losses: hand computations on tiny tensors, open_clip parity, properties."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from clipdistill.losses.baselines import (
    AffinityMimickingLoss,
    ContrastiveRelationalLoss,
    DistillClipLoss,
    FeatureDistillLoss,
    InteractiveContrastiveLoss,
    Projection,
)

# Unit rows, chosen so every dot product is a short decimal.
S_IMG = [[1.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.8, 0.0, 0.6]]
S_TXT = [[0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
T_IMG = [[0.0, 0.8, 0.6], [1.0, 0.0, 0.0], [0.6, 0.0, 0.8]]
T_TXT = [[0.8, 0.6, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
S_SCALE, T_SCALE = 2.0, 3.0


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _logits(rows: list[list[float]], cols: list[list[float]], scale: float) -> list[list[float]]:
    return [[scale * sum(a * b for a, b in zip(r, c, strict=True)) for c in cols] for r in rows]


def _log_softmax(row: list[float]) -> list[float]:
    lse = math.log(sum(math.exp(x) for x in row))
    return [x - lse for x in row]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _ref_kl(student: list[list[float]], teacher: list[list[float]]) -> float:
    rows = []
    for s_row, t_row in zip(student, teacher, strict=True):
        log_s, log_t = _log_softmax(s_row), _log_softmax(t_row)
        rows.append(sum(math.exp(lt) * (lt - ls) for ls, lt in zip(log_s, log_t, strict=True)))
    return _mean(rows)


def _ref_soft_ce(student: list[list[float]], teacher: list[list[float]]) -> float:
    rows = []
    for s_row, t_row in zip(student, teacher, strict=True):
        log_s, log_t = _log_softmax(s_row), _log_softmax(t_row)
        rows.append(-sum(math.exp(lt) * ls for ls, lt in zip(log_s, log_t, strict=True)))
    return _mean(rows)


def _ref_ce(logits: list[list[float]]) -> float:
    return _mean([-_log_softmax(row)[i] for i, row in enumerate(logits)])


def _transpose(m: list[list[float]]) -> list[list[float]]:
    return [list(col) for col in zip(*m, strict=True)]


# --- hand computations -------------------------------------------------------------------------


def test_projection_is_identity_when_widths_match_and_bias_free_linear_otherwise() -> None:
    assert isinstance(Projection(4, 4).proj, nn.Identity)
    proj = Projection(3, 5).proj
    assert isinstance(proj, nn.Linear) and proj.bias is None and proj.weight.shape == (5, 3)


def test_feature_distill_hand_computation() -> None:
    # Image rows: (1,0) vs (0,1) gives squared errors 1 + 1, the second row matches: 2 / 4 elements.
    s_img, t_img = _t([[1, 0], [0, 1]]), _t([[0, 1], [0, 1]])
    s_txt = t_txt = _t([[0.6, 0.8], [1, 0]])
    assert FeatureDistillLoss(2, 2)(s_img, s_txt, t_img, t_txt).item() == pytest.approx(0.5)


def test_feature_distill_projects_then_renormalises() -> None:
    loss_fn = FeatureDistillLoss(1, 2).double()
    with torch.no_grad():
        loss_fn.image_proj.proj.weight.copy_(_t([[3], [4]]))
        loss_fn.text_proj.proj.weight.copy_(_t([[0], [5]]))
    # Image: [1] -> (3, 4) -> (0.6, 0.8) against (1, 0): (0.16 + 0.64) / 2. Text: [2] -> (0, 1), exact.
    loss = loss_fn(_t([[1]]), _t([[2]]), _t([[1, 0]]), _t([[0, 1]]))
    assert loss.item() == pytest.approx(0.4)
    loss.backward()
    assert loss_fn.image_proj.proj.weight.grad.abs().sum() > 0


def test_contrastive_relational_closed_form() -> None:
    # Orthonormal pairs: each row's student logits are (1, 0) and the teacher's (2, 0).
    eye = _t([[1, 0], [0, 1]])
    loss = ContrastiveRelationalLoss()(eye, eye, eye, eye, torch.tensor(1.0), torch.tensor(2.0))
    a, b = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1))
    assert loss.item() == pytest.approx(a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b)))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_contrastive_relational_hand_computation(temperature: float) -> None:
    s = _logits(S_IMG, S_TXT, S_SCALE / temperature)
    t = _logits(T_IMG, T_TXT, T_SCALE / temperature)
    expected = temperature**2 * (_ref_kl(s, t) + _ref_kl(_transpose(s), _transpose(t))) / 2
    loss = ContrastiveRelationalLoss(temperature)(
        _t(S_IMG), _t(S_TXT), _t(T_IMG), _t(T_TXT), torch.tensor(S_SCALE), torch.tensor(T_SCALE)
    )
    assert loss.item() == pytest.approx(expected)


def test_interactive_contrastive_hand_computation() -> None:
    s_img_vs_t_txt = _logits(S_IMG, T_TXT, S_SCALE)
    s_txt_vs_t_img = _logits(S_TXT, T_IMG, S_SCALE)
    expected = (_ref_ce(s_img_vs_t_txt) + _ref_ce(s_txt_vs_t_img)) / 2
    loss = InteractiveContrastiveLoss(3, 3)(_t(S_IMG), _t(S_TXT), _t(T_IMG), _t(T_TXT), torch.tensor(S_SCALE))
    assert loss.item() == pytest.approx(expected)


def test_interactive_contrastive_trains_its_projection() -> None:
    loss_fn = InteractiveContrastiveLoss(2, 3).double()
    s = F.normalize(torch.randn(4, 2, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(4, 3, dtype=torch.float64), dim=-1)
    loss_fn(s, s, t, t, torch.tensor(10.0)).backward()
    assert loss_fn.image_proj.proj.weight.grad.abs().sum() > 0
    assert loss_fn.text_proj.proj.weight.grad.abs().sum() > 0


def test_affinity_mimicking_hand_computation() -> None:
    s = _logits(S_IMG, S_TXT, S_SCALE)
    t = _logits(T_IMG, T_TXT, T_SCALE)
    expected = (_ref_soft_ce(s, t) + _ref_soft_ce(_transpose(s), _transpose(t))) / 2
    loss = AffinityMimickingLoss()(
        _t(S_IMG), _t(S_TXT), _t(T_IMG), _t(T_TXT), torch.tensor(S_SCALE), torch.tensor(T_SCALE)
    )
    assert loss.item() == pytest.approx(expected)


def test_distill_clip_hand_computation() -> None:
    s = _logits(S_IMG, S_TXT, S_SCALE)
    t = _logits(T_IMG, T_TXT, T_SCALE)
    contrastive = (_ref_ce(s) + _ref_ce(_transpose(s))) / 2
    distill = (_ref_soft_ce(s, t) + _ref_soft_ce(_transpose(s), _transpose(t))) / 2
    loss = DistillClipLoss()(
        _t(S_IMG), _t(S_TXT), _t(T_IMG), _t(T_TXT), torch.tensor(S_SCALE), torch.tensor(T_SCALE)
    )
    assert loss.item() == pytest.approx(contrastive + distill)


def test_distill_clip_matches_open_clip() -> None:
    from open_clip.loss import DistillClipLoss as OpenClipDistillClipLoss

    g = torch.Generator().manual_seed(0)
    s_img, s_txt = F.normalize(torch.randn(2, 6, 8, generator=g), dim=-1)
    t_img, t_txt = F.normalize(torch.randn(2, 6, 16, generator=g), dim=-1)
    s_scale, t_scale = torch.tensor(14.3), torch.tensor(100.0)
    contrastive, distill = OpenClipDistillClipLoss()(s_img, s_txt, s_scale, t_img, t_txt, t_scale)
    ours = DistillClipLoss()(s_img, s_txt, t_img, t_txt, s_scale, t_scale)
    torch.testing.assert_close(ours, contrastive + distill)


# --- properties --------------------------------------------------------------------------------


class Batch(NamedTuple):
    s_img: torch.Tensor
    s_txt: torch.Tensor
    t_img: torch.Tensor
    t_txt: torch.Tensor
    s_scale: torch.Tensor
    t_scale: torch.Tensor

    def permuted(self, perm: list[int]) -> Batch:
        return Batch(*(x[perm] for x in self[:4]), self.s_scale, self.t_scale)

    def student_as_teacher(self) -> Batch:
        return self._replace(s_img=self.t_img, s_txt=self.t_txt, s_scale=self.t_scale)


def _feature_distill(example: Batch) -> Callable[[Batch], torch.Tensor]:
    loss_fn = FeatureDistillLoss(example.s_img.shape[1], example.t_img.shape[1])
    return lambda b: loss_fn(b.s_img, b.s_txt, b.t_img, b.t_txt)


def _contrastive_relational(example: Batch) -> Callable[[Batch], torch.Tensor]:
    return lambda b: ContrastiveRelationalLoss(temperature=2.0)(*b)


def _interactive_contrastive(example: Batch) -> Callable[[Batch], torch.Tensor]:
    loss_fn = InteractiveContrastiveLoss(example.s_img.shape[1], example.t_img.shape[1])
    return lambda b: loss_fn(b.s_img, b.s_txt, b.t_img, b.t_txt, b.s_scale)


def _affinity_mimicking(example: Batch) -> Callable[[Batch], torch.Tensor]:
    return lambda b: AffinityMimickingLoss()(*b)


def _distill_clip(example: Batch) -> Callable[[Batch], torch.Tensor]:
    return lambda b: DistillClipLoss()(*b)


LOSSES = [
    _feature_distill,
    _contrastive_relational,
    _interactive_contrastive,
    _affinity_mimicking,
    _distill_clip,
]
PROPERTY = settings(max_examples=25, deadline=None)


# Raw norms 10**exponent before normalisation. Beyond about 1e-12 and 1e19 float32 normalisation
# breaks down (rows come out far from unit, or zero): losses must stay finite there, while the
# exact properties are checked where normalisation gives unit rows.
DEGENERATE, UNIT = (-30, 30), (-10, 18)


def _embeddings(g: torch.Generator, b: int, d: int, exponent: int, identical_rows: bool) -> torch.Tensor:
    x = F.normalize(torch.randn(b, d, generator=g), dim=-1) * 10.0**exponent
    if identical_rows:
        x = x[:1].expand(b, d)
    return F.normalize(x, dim=-1)


@st.composite
def batches(draw: st.DrawFn, exponents: tuple[int, int] = UNIT) -> tuple[Batch, list[int]]:
    """Student and teacher embeddings of any widths, sometimes with identical rows, and a permutation."""
    b, ds, dt = draw(st.integers(1, 6)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    exponent, identical = draw(st.integers(*exponents)), draw(st.booleans())
    s_img, s_txt = (_embeddings(g, b, ds, exponent, identical) for _ in range(2))
    t_img, t_txt = (_embeddings(g, b, dt, exponent, identical) for _ in range(2))
    s_scale, t_scale = (torch.tensor(draw(st.sampled_from([0.01, 1.0, 100.0]))) for _ in range(2))
    return Batch(s_img, s_txt, t_img, t_txt, s_scale, t_scale), draw(st.permutations(range(b)))


@pytest.mark.parametrize("make_loss", LOSSES)
@PROPERTY
@given(case=batches(DEGENERATE))
def test_loss_and_gradient_are_finite(make_loss: Callable, case: tuple[Batch, list[int]]) -> None:
    batch, _ = case
    s_img, s_txt = batch.s_img.requires_grad_(), batch.s_txt.requires_grad_()
    loss = make_loss(batch)(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s_img.grad).all() and torch.isfinite(s_txt.grad).all()


@pytest.mark.parametrize("make_loss", LOSSES)
@PROPERTY
@given(case=batches(DEGENERATE))
def test_loss_is_invariant_to_batch_order(make_loss: Callable, case: tuple[Batch, list[int]]) -> None:
    batch, perm = case
    loss_fn = make_loss(batch)
    torch.testing.assert_close(loss_fn(batch.permuted(perm)), loss_fn(batch), rtol=1e-5, atol=1e-5)


@PROPERTY
@given(case=batches())
def test_feature_distill_is_zero_when_student_is_teacher(case: tuple[Batch, list[int]]) -> None:
    batch = case[0].student_as_teacher()
    torch.testing.assert_close(_feature_distill(batch)(batch), torch.tensor(0.0))


@PROPERTY
@given(case=batches())
def test_contrastive_relational_is_nonnegative_and_zero_when_student_is_teacher(
    case: tuple[Batch, list[int]],
) -> None:
    batch = case[0]
    assert _contrastive_relational(batch)(batch) >= -1e-6
    same = batch.student_as_teacher()
    torch.testing.assert_close(_contrastive_relational(same)(same), torch.tensor(0.0))


@PROPERTY
@given(case=batches())
def test_affinity_mimicking_is_bounded_by_and_equals_teacher_entropy(case: tuple[Batch, list[int]]) -> None:
    """Gibbs: H(p_t, p_s) >= H(p_t), with equality when the student is the teacher."""
    batch = case[0]
    t_logits = batch.t_scale * batch.t_img @ batch.t_txt.T
    entropy = (_entropy(t_logits) + _entropy(t_logits.T)) / 2
    assert _affinity_mimicking(batch)(batch) >= entropy - 1e-4
    same = batch.student_as_teacher()
    torch.testing.assert_close(_affinity_mimicking(same)(same), entropy, rtol=1e-5, atol=1e-4)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    return -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1).mean()


def test_interactive_contrastive_own_scale_starts_at_clip_kd_value_and_learns() -> None:
    """CLIP-KD's ICL has its own learnable cross-modal scale from 1/0.07, not the student's."""
    own = InteractiveContrastiveLoss(3, 3, own_scale=True).double()
    assert own.logit_scale.exp().item() == pytest.approx(1 / 0.07)
    args = (_t(S_IMG), _t(S_TXT), _t(T_IMG), _t(T_TXT))
    loss = own(*args, torch.tensor(S_SCALE))  # the student's scale is ignored
    expected = (_ref_ce(_logits(S_IMG, T_TXT, 1 / 0.07)) + _ref_ce(_logits(S_TXT, T_IMG, 1 / 0.07))) / 2
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert own.logit_scale.grad is not None and own.logit_scale.grad.abs() > 0
    assert InteractiveContrastiveLoss(3, 3).logit_scale is None
