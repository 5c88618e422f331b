import numpy as np
import pytest
import torch

from clipdistill.config import DataConfig, ModelConfig
from clipdistill.data.sampler import StepSampler
from clipdistill.data.sources import make_pair_source
from clipdistill.models.factory import create_model
from conftest import needs_lab

POOL = np.arange(1000, 1096)[::-1].copy()  # sample ids need not be 0..n-1 or sorted


def test_ranks_slices_make_the_world_one_batch():
    one = StepSampler(POOL, 16, seed=3)
    ranks = [StepSampler(POOL, 16, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(15):  # crosses epoch boundaries (6 steps per epoch)
        parts = [s.indices(step) for s in ranks]
        assert all(len(p) == 8 for p in parts)
        assert np.array_equal(np.concatenate(parts), one.indices(step))


def test_resumed_schedule_equals_the_uninterrupted_one():
    full = list(StepSampler(POOL, 16, seed=3).schedule(0, 20))
    resumed = list(StepSampler(POOL, 16, seed=3).schedule(0, 7)) + list(
        StepSampler(POOL, 16, seed=3).schedule(7, 20)  # a fresh sampler, as after kill -9
    )
    assert all(np.array_equal(a, b) for a, b in zip(full, resumed, strict=True))
    assert not np.array_equal(full[0], list(StepSampler(POOL, 16, seed=4).schedule(0, 1))[0])


def test_each_epoch_is_a_permutation_of_the_pool():
    sampler = StepSampler(POOL, 16, seed=0)
    epochs = [np.concatenate([sampler.indices(e * 6 + i) for i in range(6)]) for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch.tolist()) == sorted(POOL.tolist())
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch


def test_epoch_with_a_remainder_has_no_repeats():
    pool = np.arange(100)
    sampler = StepSampler(pool, 16, seed=0)  # 6 full batches, 4 samples left out per epoch
    epoch = np.concatenate([sampler.indices(i) for i in range(6)])
    assert len(np.unique(epoch)) == 96 and set(epoch.tolist()) <= set(pool.tolist())


def test_sampler_rejects_bad_sizes():
    with pytest.raises(ValueError, match="not divisible"):
        StepSampler(POOL, 15, seed=0, world_size=2)
    with pytest.raises(ValueError, match="only 96 training samples"):
        StepSampler(POOL, 128, seed=0)


@needs_lab
def test_lab_pairs_batches():
    loaded = create_model(ModelConfig(name="lab-student-tiny"))
    source = make_pair_source(DataConfig(val_size=128, train_size=256), loaded.tokenizer, loaded.preprocess)
    assert len(source) == 256
    (batch,) = source.batches([np.array([5, 0, 255])])
    assert batch["image"].shape == (3, 3, 32, 32)
    assert batch["index"].tolist() == [5, 0, 255]
    assert batch["skipped"] == []
    expected = loaded.tokenizer([source.split.captions[i] for i in (5, 0, 255)])
    assert torch.equal(batch["text"], expected)
    # normalised with the lab's statistics: the black padding maps to -mean / std
    assert torch.allclose(batch["image"][:, :, 0, 0], torch.tensor(-0.286 / 0.353))

    test = make_pair_source(DataConfig(val_size=128), loaded.tokenizer, loaded.preprocess, split="test")
    assert len(test) == 10000


def test_unknown_kind_is_refused():
    loaded = create_model(ModelConfig(name="lab-student-tiny"))
    with pytest.raises(ValueError, match="unknown data.kind 'hdf5'"):
        make_pair_source(DataConfig(kind="hdf5"), loaded.tokenizer, loaded.preprocess)
