import numpy as np
import pytest
import torch

from clipdistill.config import ConfigError, DataConfig, ModelConfig
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


@pytest.mark.parametrize(("path", "what"), [("missing.csv", "does not exist"), (".", "is a folder")])
def test_a_table_that_is_not_a_file_is_one_line(tmp_path, path, what):
    """Before pyarrow's own message ("Failed to open local file", "Expected file path")."""
    loaded = create_model(ModelConfig(name="lab-student-tiny"))
    where = str(tmp_path / path)
    with pytest.raises(ConfigError, match=f"data.path '{where}' {what}: give the CSV, TSV or Parquet table"):
        make_pair_source(DataConfig(kind="csv", path=where), loaded.tokenizer, loaded.preprocess)


def test_one_pass_normalised_tensor_equals_torchvision_to_tensor_then_normalize():
    from PIL import Image
    from torchvision import transforms as T

    from clipdistill.data.sources import ResizeCropNormalize

    mean, std = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)
    pixels = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    for image in (Image.fromarray(pixels), Image.fromarray(pixels[..., 0])):  # RGB and grayscale
        expected = T.Normalize(mean, std)(T.ToTensor()(image.convert("RGB")))
        out = ResizeCropNormalize(20, mean, std)(image)  # already at size: no resize
        assert out.shape == (3, 20, 20) and out.dtype == torch.float32 and out.is_contiguous()
        assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("size", [(256, 256), (300, 200), (200, 517), (224, 224), (100, 90)])
def test_pil_transform_within_one_grey_level_of_clips_pil_resize_crop(size):
    """Tolerance of the uint8 torch resize against PIL's (CLIP's own preprocess): at most one grey
    level anywhere, at most 0.2 on average (pure noise, the worst case: rounding differs)."""
    from PIL import Image
    from torchvision import transforms as T

    from clipdistill.data.sources import pil_transform
    from clipdistill.models.factory import Preprocess

    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    bicubic = T.InterpolationMode.BICUBIC
    clip = T.Compose([T.Resize(64, interpolation=bicubic), T.CenterCrop(64), T.ToTensor()])
    out = pil_transform(Preprocess(64, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))(image)
    expected = clip(image)
    assert out.shape == expected.shape == (3, 64, 64)
    diff = (out - expected).abs() * 255
    assert diff.max() <= 1.0 + 1e-4 and diff.mean() <= 0.2
