"""ComKD-CLIP modules: each formula against a hand computation, α behaviour, properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from clipdistill.losses.comkd import (
    CrossEduAttention,
    EduAttention,
    IFAlignLoss,
    Projector,
    RefinementKDLoss,
    relative_entropy,
)


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _softmax(row: list[float]) -> list[float]:
    z = sum(math.exp(x) for x in row)
    return [math.exp(x) / z for x in row]


# --- hand computations -------------------------------------------------------------------------


def test_projector_is_linear_gelu_linear() -> None:
    proj = Projector(1, 1, hidden=2).double()
    first, gelu, second = proj.net
    assert isinstance(gelu, nn.GELU) and Projector(3, 5).net[0].out_features == 5
    with torch.no_grad():
        first.weight.copy_(_t([[1], [-1]]))
        second.weight.copy_(_t([[1, 1]]))
        first.bias.zero_()
        second.bias.zero_()
    # gelu(x) + gelu(-x) = x·(2Φ(x) − 1) = x·erf(x / √2).
    assert proj(_t([[1.0]])).item() == pytest.approx(math.erf(1 / math.sqrt(2)))


def test_ifalign_hand_computation() -> None:
    # Student: means (2, 1), population variances (1, 1). Teacher: means (0, 1), variances (0, 1).
    student, teacher = _t([[1, 0], [3, 2]]), _t([[0, 0], [0, 2]])
    # Averaged over the two dims: |Δμ| = (2 + 0) / 2, |Δσ²| = (1 + 0) / 2.
    assert IFAlignLoss("mean")(student, teacher).item() == pytest.approx(1.5)


def test_eduattention_hand_computation() -> None:
    edu = EduAttention(2, attention_scale=0.5).double()
    with torch.no_grad():
        edu.fc.weight.copy_(_t([[1, 0], [0, 2]]))
        edu.fc.bias.copy_(_t([0, 1]))
        edu.alpha.fill_(0.5)
    p, bank = _t([[1, 0]]), _t([[1, 0], [0.6, 0.8], [0, 1]])
    a = _softmax([1 / 0.5, 0.6 / 0.5, 0 / 0.5])  # p·W_tᵀ / C
    read = [a[0] + 0.6 * a[1], 0.8 * a[1] + a[2]]  # A·W_t
    f_att = [read[0], 2 * read[1] + 1]  # FC
    torch.testing.assert_close(edu(p, bank), _t([[1 + 0.5 * f_att[0], 0.5 * f_att[1]]]))


def test_eduattention_is_identity_while_alpha_is_zero() -> None:
    edu = EduAttention(4, attention_scale=0.07)
    p, bank = torch.randn(3, 4), F.normalize(torch.randn(5, 4), dim=-1)
    assert torch.equal(edu(p, bank), p)


def test_alpha_gets_gradient_only_once_the_attention_branch_is_nonzero() -> None:
    p, bank = torch.randn(3, 4), F.normalize(torch.randn(5, 4), dim=-1)
    target = F.normalize(torch.randn(3, 4), dim=-1)
    kd = RefinementKDLoss(temperature=1.0, logit_scale=10.0)

    silent = EduAttention(4, attention_scale=0.07)
    nn.init.zeros_(silent.fc.weight)
    nn.init.zeros_(silent.fc.bias)
    kd(silent(p, bank), target, bank).backward()
    assert silent.alpha.grad == 0

    edu = EduAttention(4, attention_scale=0.07)
    kd(edu(p, bank), target, bank).backward()
    assert edu.alpha.grad != 0
    assert edu.fc.weight.grad.abs().sum() == 0  # FC only learns once α has moved off zero


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_refinement_kd_hand_computation(temperature: float) -> None:
    # f_e rows normalise to (1, 0) and (0.6, 0.8); the bank is the identity, τ⁻¹ = 10.
    f_e, teacher, bank = _t([[2, 0], [3, 4]]), _t([[0.6, 0.8], [0, 1]]), _t([[1, 0], [0, 1]])
    q_s, q_t = [[10, 0], [6, 8]], [[6, 8], [0, 10]]
    kls = []
    for s_row, t_row in zip(q_s, q_t, strict=True):
        p_s = _softmax([x / temperature for x in s_row])
        p_t = _softmax([x / temperature for x in t_row])
        kls.append(sum(t * math.log(t / s) for s, t in zip(p_s, p_t, strict=True)))
    expected = temperature**2 * sum(kls) / 2  # batchmean
    loss = RefinementKDLoss(temperature, logit_scale=10.0)(f_e, teacher, bank)
    assert loss.item() == pytest.approx(expected)


def test_comkd_pipeline_trains_projector_and_alpha() -> None:
    proj, edu = Projector(6, 4), EduAttention(4, attention_scale=0.07)
    u_s, u_t = torch.randn(8, 6), F.normalize(torch.randn(8, 4), dim=-1)
    bank = F.normalize(torch.randn(5, 4), dim=-1)
    p = proj(u_s)
    loss = RefinementKDLoss()(edu(p, bank), u_t, bank) + IFAlignLoss()(p, u_t)
    loss.backward()
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in proj.parameters())
    assert edu.alpha.grad != 0


# --- properties --------------------------------------------------------------------------------

PROPERTY = settings(max_examples=25, deadline=None)


@st.composite
def cases(draw: st.DrawFn) -> dict:
    """Raw student features of magnitude 1e-8..1e8 (the projector's output is not normalised), the
    teacher's unit image features and text bank, a batch permutation and a class permutation."""
    b, k, d = draw(st.integers(1, 6)), draw(st.integers(1, 6)), draw(st.integers(1, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    p = torch.randn(b, d, generator=g) * 10.0 ** draw(st.integers(-8, 8))
    if draw(st.booleans()):
        p = p[:1].expand(b, d)
    return {
        "p": p,
        "teacher": F.normalize(torch.randn(b, d, generator=g), dim=-1),
        "bank": F.normalize(torch.randn(k, d, generator=g), dim=-1),
        "perm": draw(st.permutations(range(b))),
        "class_perm": draw(st.permutations(range(k))),
    }


@PROPERTY
@given(case=cases())
def test_ifalign_properties(case: dict) -> None:
    p, teacher, perm = case["p"], case["teacher"], case["perm"]
    loss = IFAlignLoss()(p, teacher)
    assert torch.isfinite(loss) and loss >= 0
    torch.testing.assert_close(IFAlignLoss()(p[perm], teacher[perm]), loss)
    assert IFAlignLoss()(teacher, teacher) == 0


@PROPERTY
@given(case=cases())
def test_eduattention_properties(case: dict) -> None:
    edu = EduAttention(case["p"].shape[1], attention_scale=0.07)
    nn.init.constant_(edu.alpha, 0.5)
    p, bank, perm = case["p"], case["bank"], case["perm"]
    f_e = edu(p, bank)
    assert torch.isfinite(f_e).all()
    torch.testing.assert_close(edu(p[perm], bank), f_e[perm])  # per-sample
    torch.testing.assert_close(edu(p, bank[case["class_perm"]]), f_e)  # class order is irrelevant


@PROPERTY
@given(case=cases(), temperature=st.sampled_from([1.0, 4.0]))
def test_refinement_kd_properties(case: dict, temperature: float) -> None:
    p, teacher, bank, perm = case["p"].requires_grad_(), case["teacher"], case["bank"], case["perm"]
    kd = RefinementKDLoss(temperature, logit_scale=100.0)
    loss = kd(p, teacher, bank)
    loss.backward()
    assert torch.isfinite(loss) and loss >= -1e-6 and torch.isfinite(p.grad).all()
    torch.testing.assert_close(kd(p[perm], teacher[perm], bank), loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd(p, teacher, bank[case["class_perm"]]), loss, rtol=1e-5, atol=1e-5)
    # Zero when the student's feature points where the teacher's does, whatever its length.
    torch.testing.assert_close(kd(7.0 * teacher, teacher, bank), torch.tensor(0.0), atol=1e-5, rtol=0)


# --- paper-faithful options: cross EduAttention, summed IFAlign, PromptKD's KD reduction ------


def _clustered(k: int = 10, dim: int = 32, per_class: int = 4, seed: int = 0):
    """Unit class features W_t [k, dim] and projected features p that sit near one class each."""
    g = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(k, dim, generator=g), dim=-1)
    labels = torch.arange(k).repeat_interleave(per_class)
    p = bank[labels] + 0.05 * torch.randn(len(labels), dim, generator=g)
    return bank, p


@pytest.mark.parametrize("heads", [1, 4])
def test_cross_eduattention_is_selective_where_mean_text_is_uniform(heads: int) -> None:
    bank, p = _clustered()
    log_k = math.log(len(bank))
    _, cross = CrossEduAttention(bank.shape[1], heads=heads).attend(p, bank)
    _, mean_text = EduAttention(bank.shape[1], attention_scale=1.0).attend(p, bank)
    assert cross.shape == (len(p), heads, len(bank))
    assert relative_entropy(cross) < 0.3  # well below log K
    assert relative_entropy(mean_text) > 0.9  # today's module: near uniform on unit vectors
    # and it attends to the class each feature sits near (the first head sees all dims when heads = 1)
    if heads == 1:
        assert (cross[:, 0].argmax(dim=-1) == torch.arange(len(bank)).repeat_interleave(4)).all()
    assert relative_entropy(torch.full((3, 1, 7), 1 / 7)) == pytest.approx(1.0)
    assert log_k > 0


def test_cross_eduattention_gradients_reach_every_projection_alpha_and_temperature() -> None:
    bank, p = _clustered()
    edu = CrossEduAttention(bank.shape[1], heads=2)
    target = F.normalize(torch.randn_like(p), dim=-1)
    loss = (F.normalize(edu(p, bank), dim=-1) - target).pow(2).sum()
    loss.backward()
    for name in ("q.weight", "k.weight", "v.weight", "fc.weight", "alpha", "logit_scale"):
        grad = dict(edu.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_cross_eduattention_refuses_heads_that_do_not_divide_the_width() -> None:
    with pytest.raises(ValueError, match="attention_heads"):
        CrossEduAttention(10, heads=3)


def test_ifalign_sum_is_width_times_mean() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    summed = IFAlignLoss("sum")(s, t)
    assert summed == pytest.approx(16 * IFAlignLoss("mean")(s, t).item(), rel=1e-6)
    s_var, s_mean = torch.var_mean(s, dim=0, correction=0)
    t_var, t_mean = torch.var_mean(t, dim=0, correction=0)  # the formula's two L1 norms
    assert summed == pytest.approx(((s_mean - t_mean).abs().sum() + (s_var - t_var).abs().sum()).item())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_promptkd_reduction_is_promptkds_formula(temperature: float) -> None:
    """PromptKD's trainer: kl_div(log_softmax(s/T), softmax(t/T), reduction='sum') * T*T / s.numel()."""
    g = torch.Generator().manual_seed(2)
    bank = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    f_e, u_t = torch.randn(3, 8, generator=g), F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    loss = RefinementKDLoss(temperature, 100.0, reduction="promptkd")(f_e, u_t, bank)
    stu_logits = 100.0 * F.normalize(f_e, dim=-1) @ bank.T
    tea_logits = 100.0 * u_t @ bank.T
    expected = (
        F.kl_div(
            F.log_softmax(stu_logits / temperature, dim=1),
            F.softmax(tea_logits / temperature, dim=1),
            reduction="sum",
        )
        * (temperature * temperature)
        / stu_logits.numel()
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    batchmean = RefinementKDLoss(temperature, 100.0)(f_e, u_t, bank)
    assert batchmean.item() == pytest.approx(5 * loss.item(), rel=1e-5)  # K times PromptKD's
