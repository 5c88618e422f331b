"""CLIP-CID losses: hand computations on tiny tensors, PartialFC sampling, and a 2-process check that
sharded prototypes and gathered negatives give the single-process loss and gradients."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from clipdistill.losses.cid import ClusterDiscriminationLoss, InstanceDiscriminationLoss

EPS = 1e-6


def _arc(cos: float, margin: float) -> float:
    """cos(θ + m) for cos θ in ArcFace's monotonic range, clamped as the loss does."""
    return math.cos(math.acos(min(max(cos, -1 + EPS), 1 - EPS)) + margin)


def _ce(logits: list[float], target: int) -> float:
    return math.log(sum(math.exp(x) for x in logits)) - logits[target]


# --- cluster discrimination -------------------------------------------------------------------------


def test_margin_softmax_matches_hand_computation() -> None:
    # Unnormalised on purpose: z -> (0.8, 0.6) and (0, 1); centroids -> e1, e2, (0.6, 0.8).
    z = torch.tensor([[4.0, 3.0], [0.0, 2.0]])
    centroids = torch.tensor([[2.0, 0.0], [0.0, 5.0], [3.0, 4.0]])
    labels = torch.tensor([0, 2])
    s, m = 4.0, 0.3
    loss = ClusterDiscriminationLoss(centroids, scale=s, margin=m)(z, labels)
    row0 = [s * _arc(0.8, m), s * 0.6, s * (0.8 * 0.6 + 0.6 * 0.8)]
    row1 = [s * 0.0, s * (1 - EPS), s * _arc(0.8, m)]
    expected = (_ce(row0, 0) + _ce(row1, 2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_margin_makes_the_loss_larger() -> None:
    torch.manual_seed(0)
    z, centroids, labels = torch.randn(8, 16), torch.randn(5, 16), torch.randint(0, 5, (8,))
    plain = ClusterDiscriminationLoss(centroids, margin=0.0)(z, labels)
    no_margin_ce = F.cross_entropy(32.0 * F.normalize(z) @ F.normalize(centroids).T, labels)
    assert plain.item() == pytest.approx(no_margin_ce.item(), rel=1e-5)
    assert ClusterDiscriminationLoss(centroids, margin=0.2)(z, labels) > plain + 0.1


def test_target_logit_keeps_falling_past_pi_minus_m() -> None:
    loss = ClusterDiscriminationLoss(torch.eye(2), margin=0.5)
    cos = torch.cos(torch.linspace(0, math.pi, 200)).clamp(-1 + EPS, 1 - EPS)
    target = loss._cos_plus_margin(cos)
    assert (target.diff() <= 1e-6).all()
    assert torch.isfinite(target).all()
    cos.requires_grad_()
    loss._cos_plus_margin(cos).sum().backward()
    assert torch.isfinite(cos.grad).all()


def test_prototypes_frozen_buffer_or_learnable_parameter() -> None:
    torch.manual_seed(0)
    centroids = torch.randn(6, 8)
    frozen = ClusterDiscriminationLoss(centroids)
    assert "prototypes" in dict(frozen.named_buffers()) and not list(frozen.parameters())
    learnable = ClusterDiscriminationLoss(centroids, learnable=True)
    assert isinstance(learnable.prototypes, nn.Parameter)
    z = torch.randn(4, 8, requires_grad=True)
    learnable(z, torch.tensor([0, 1, 1, 3])).backward()
    assert learnable.prototypes.grad is not None and learnable.prototypes.grad.abs().sum() > 0
    assert z.grad is not None and torch.isfinite(z.grad).all()


def test_partial_fc_scoring_every_class_equals_full_loss() -> None:
    torch.manual_seed(0)
    z, centroids = torch.randn(12, 8), torch.randn(5, 8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1])  # every class is a positive
    full = ClusterDiscriminationLoss(centroids)(z, labels)
    assert ClusterDiscriminationLoss(centroids, sample_rate=0.2)(z, labels).item() == pytest.approx(
        full.item()
    )
    assert ClusterDiscriminationLoss(centroids, sample_rate=1.0)(z, labels).item() == full.item()


def test_partial_fc_keeps_every_positive_and_scores_the_subset() -> None:
    torch.manual_seed(0)
    z, centroids = torch.randn(6, 8), torch.randn(100, 8)
    labels = torch.tensor([3, 97, 3, 50, 12, 60])
    loss_fn = ClusterDiscriminationLoss(centroids, sample_rate=0.1, margin=0.0, scale=10.0)
    index, remapped = loss_fn.sample(labels)
    assert index is not None and index.numel() == 10
    assert (index.diff() > 0).all() and (index[remapped] == labels).all()

    torch.manual_seed(1)
    loss = loss_fn(z, labels)
    torch.manual_seed(1)
    index, remapped = loss_fn.sample(labels)
    subset_logits = 10.0 * F.normalize(z) @ F.normalize(centroids[index]).T
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(F.cross_entropy(subset_logits, remapped).item(), rel=1e-5)

    loss_fn.eval()
    assert loss_fn.sample(labels)[0] is None


def test_partial_fc_when_positives_outnumber_the_sample() -> None:
    labels = torch.arange(8)
    index, remapped = ClusterDiscriminationLoss(torch.randn(10, 4), sample_rate=0.1).sample(labels)
    assert index.tolist() == list(range(8)) and remapped.tolist() == list(range(8))


# --- instance discrimination ------------------------------------------------------------------------

S_IMG = [[1.0, 0.0], [0.0, 1.0]]
S_TXT = [[0.8, 0.6], [0.0, 1.0]]
T_IMG = [[0.6, 0.8], [0.0, 1.0]]
T_TXT = [[1.0, 0.0], [0.6, 0.8]]


def _nce(rows: list[list[float]], cols: list[list[float]], scale: float) -> float:
    logits = [[scale * sum(a * b for a, b in zip(r, c, strict=True)) for c in cols] for r in rows]
    return sum(_ce(row, i) for i, row in enumerate(logits)) / len(rows)


def _instance_inputs() -> list[torch.Tensor]:
    return [torch.tensor(x) for x in (S_IMG, S_TXT, T_IMG, T_TXT)]


def test_instance_loss_matches_hand_computation() -> None:
    scale = 1 / 0.5
    terms = {
        "ii": _nce(S_IMG, T_IMG, scale),
        "it": _nce(S_IMG, T_TXT, scale),
        "ti": _nce(S_TXT, T_IMG, scale),
    }
    loss = InstanceDiscriminationLoss(temperature=0.5)(*_instance_inputs())
    assert loss.item() == pytest.approx(sum(terms.values()) / 3, rel=1e-6)
    only_it = InstanceDiscriminationLoss(temperature=0.5, pairs=("it",))(*_instance_inputs())
    assert only_it.item() == pytest.approx(terms["it"], rel=1e-6)
    two = InstanceDiscriminationLoss(temperature=0.5, pairs=("ii", "ti"))(*_instance_inputs())
    assert two.item() == pytest.approx((terms["ii"] + terms["ti"]) / 2, rel=1e-6)


def test_instance_loss_temperature_and_validation() -> None:
    fixed = InstanceDiscriminationLoss()
    assert not list(fixed.parameters())
    learnable = InstanceDiscriminationLoss(temperature=0.5, learnable_temperature=True)
    s_img, s_txt, t_img, t_txt = _instance_inputs()
    s_img.requires_grad_()
    t_img.requires_grad_()
    learnable(s_img, s_txt, t_img, t_txt).backward()
    assert learnable.log_logit_scale.grad is not None and learnable.log_logit_scale.grad != 0
    assert s_img.grad is not None and t_img.grad is None  # no gradient into the teacher
    with pytest.raises(ValueError, match="pairs"):
        InstanceDiscriminationLoss(pairs=("tt",))


# --- distributed: world size 2 equals one process ---------------------------------------------------

GLOBAL_BATCH, DIM, CLASSES, WORLD = 6, 4, 7, 2  # 7 classes: uneven shards (4 + 3)


def _global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "z": torch.randn(GLOBAL_BATCH, DIM, generator=g),
        "labels": torch.tensor([0, 6, 3, 3, 5, 1]),
        "centroids": torch.randn(CLASSES, DIM, generator=g),
        **{k: F.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=g)) for k in ("si", "st", "ti", "tt")},
    }


def _losses(data: dict[str, torch.Tensor], rows: slice, shard: bool) -> dict[str, torch.Tensor]:
    z = data["z"][rows].clone().requires_grad_()
    cluster = ClusterDiscriminationLoss(data["centroids"], scale=8.0, learnable=True, shard=shard)
    cluster_loss = cluster(z, data["labels"][rows])
    cluster_loss.backward()
    si = data["si"][rows].clone().requires_grad_()
    st = data["st"][rows].clone().requires_grad_()
    instance_loss = InstanceDiscriminationLoss(temperature=0.5)(si, st, data["ti"][rows], data["tt"][rows])
    instance_loss.backward()
    sampled = ClusterDiscriminationLoss(data["centroids"], sample_rate=0.5, shard=shard)
    return {
        "cluster": cluster_loss.detach(),
        "z_grad": z.grad,
        "proto_grad": cluster.prototypes.grad,
        "instance": instance_loss.detach(),
        "si_grad": si.grad,
        "st_grad": st.grad,
        "sampled": sampled(data["z"][rows], data["labels"][rows]).detach(),
    }


def _worker(rank: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    local = GLOBAL_BATCH // WORLD
    torch.save(
        _losses(_global_batch(), slice(rank * local, (rank + 1) * local), shard=True), f"{out_dir}/{rank}.pt"
    )
    dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_and_gathered_losses_match_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    single = _losses(_global_batch(), slice(None), shard=False)
    local = GLOBAL_BATCH // WORLD
    blocks = [slice(0, 4), slice(4, 7)]
    for r, out in enumerate(ranks):
        rows = slice(r * local, (r + 1) * local)
        # Sharded: every rank reports the global mean; DDP's averaging divides the local grad by WORLD.
        assert out["cluster"].item() == pytest.approx(single["cluster"].item(), rel=1e-5)
        torch.testing.assert_close(out["z_grad"], WORLD * single["z_grad"][rows], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out["proto_grad"], single["proto_grad"][blocks[r]], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out["si_grad"], WORLD * single["si_grad"][rows], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(out["st_grad"], WORLD * single["st_grad"][rows], rtol=1e-4, atol=1e-6)
        assert torch.isfinite(out["sampled"])
    # Instance loss: each rank's local mean over global negatives; their mean is the global loss.
    mean_instance = sum(out["instance"] for out in ranks) / WORLD
    assert mean_instance.item() == pytest.approx(single["instance"].item(), rel=1e-5)
