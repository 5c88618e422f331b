import numpy as np
import pytest
import torch

from clipdistill.config import DataConfig, ModelConfig
from clipdistill.data.sources import make_pair_source
from clipdistill.models.factory import create_model
from conftest import needs_lab


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
