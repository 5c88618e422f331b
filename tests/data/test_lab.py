import gzip

import numpy as np
import pytest
import torch

from clipdistill.config import ConfigError, DataConfig, ModelConfig, load_config
from clipdistill.data.lab import (
    CLASSNAMES,
    DEBIAN_DIR,
    FILES,
    TEMPLATES,
    LabDataError,
    caption_for,
    load_lab,
    read_idx,
    shift_domain,
    to_pixels,
)
from clipdistill.models.factory import create_student
from conftest import needs_lab


@pytest.fixture(scope="module")
def lab():
    return load_lab(DataConfig(val_size=500))  # its tests are marked needs_lab


@needs_lab
def test_split_sizes_labels_and_captions(lab):
    assert (len(lab.train), len(lab.val), len(lab.test)) == (60000 - 500, 500, 10000)
    for split in (lab.train, lab.val, lab.test):
        assert split.images.shape == (len(split), 28, 28) and split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64
        assert int(split.labels.min()) == 0 and int(split.labels.max()) == 9
        assert len(split.captions) == len(split)
    assert lab.classnames == CLASSNAMES and len(CLASSNAMES) == 10
    # every caption names its image's class
    for split in (lab.val, lab.test):
        for label, caption in zip(split.labels[:200].tolist(), split.captions[:200], strict=True):
            assert CLASSNAMES[label] in caption


def test_templates():
    assert len(TEMPLATES) >= 20
    assert len(set(TEMPLATES)) == len(TEMPLATES)
    assert all("{c}" in t for t in TEMPLATES)


def test_caption_is_deterministic_and_varied():
    assert caption_for(3, 12345) == caption_for(3, 12345)
    assert caption_for(3, 12345).format() == caption_for(3, 12345)  # no unfilled placeholder
    assert len({caption_for(0, i) for i in range(500)}) == len(TEMPLATES)


@needs_lab
def test_splits_are_reproducible_and_disjoint(lab):
    again = load_lab(DataConfig(val_size=500, train_size=1000))
    assert torch.equal(again.val.images, lab.val.images)
    assert again.val.captions == lab.val.captions
    assert torch.equal(again.train.images, lab.train.images[:1000])
    assert again.train.captions == lab.train.captions[:1000]
    # no validation image is also a training image
    train_keys = {bytes(x) for x in lab.train.images.numpy()[:5000]}
    assert not train_keys & {bytes(x) for x in lab.val.images.numpy()}


def test_to_pixels_shape_and_range():
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    pixels = to_pixels(images, 32)
    assert pixels.shape == (3, 3, 32, 32)
    assert 0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    assert torch.equal(pixels[:, 0, 2:30, 2:30], images.float() / 255)
    assert to_pixels(images, 48).shape == (3, 3, 48, 48)


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_read_idx_plain_and_gzipped(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(_idx_bytes(array))
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(_idx_bytes(array)))
    assert np.array_equal(read_idx(tmp_path / "a.idx"), array)
    assert np.array_equal(read_idx(tmp_path / "a.idx.gz"), array)


@pytest.mark.parametrize("keep", [5, 10, 30])
def test_read_idx_truncated_is_a_lab_error(tmp_path, keep):
    data = _idx_bytes(np.zeros((2, 3, 4), dtype=np.uint8))[:keep]  # mid-header and mid-body
    (tmp_path / "a.idx").write_bytes(data)
    with pytest.raises(LabDataError, match="truncated"):
        read_idx(tmp_path / "a.idx")


def test_read_idx_truncated_gzip_is_a_lab_error(tmp_path):
    data = gzip.compress(_idx_bytes(np.arange(4000, dtype=np.uint8).reshape(40, 100) % 251))
    (tmp_path / "a.idx.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(LabDataError, match="apt-get install dataset-fashion-mnist"):
        read_idx(tmp_path / "a.idx.gz")


def test_read_idx_wrong_magic(tmp_path):
    (tmp_path / "a.idx").write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(LabDataError, match="not an IDX file"):
        read_idx(tmp_path / "a.idx")


def test_missing_files_name_the_package(tmp_path):
    with pytest.raises(LabDataError) as info:
        load_lab(DataConfig(path=str(tmp_path)))
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert str(tmp_path) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


@needs_lab
def test_truncated_dataset_file_in_a_folder(tmp_path):
    for image_file, label_file in FILES.values():
        for name in (image_file, label_file):
            (tmp_path / name).symlink_to(f"{DEBIAN_DIR}/{name}")
    labels = tmp_path / FILES["test"][1]
    data = gzip.decompress(labels.read_bytes())
    labels.unlink()
    labels.write_bytes(gzip.compress(data[:-10]))
    with pytest.raises(LabDataError, match="truncated"):
        load_lab(DataConfig(path=str(tmp_path), val_size=10))


@needs_lab
def test_shifted_domain_is_a_real_transform_of_every_split(lab):
    images = lab.test.images[:50].numpy()
    assert np.array_equal(shift_domain(images, "inverted"), 255 - images)
    blurred = shift_domain(images, "blurred")
    assert blurred.dtype == np.uint8 and blurred.shape == images.shape and not np.array_equal(blurred, images)
    with pytest.raises(ConfigError, match="data.domain: 'sepia' is not one of '', 'inverted'"):
        load_config(None, ["--data.domain", "sepia"])


def test_a_target_domain_has_its_own_cache(tmp_path):
    from clipdistill.config import load_config
    from clipdistill.runs import cache_dir

    plain = load_config(None, ["--run_dir", str(tmp_path)])
    target = load_config(None, ["--run_dir", str(tmp_path), "--data.domain", "low_contrast"])
    assert cache_dir(plain) == tmp_path / "cache" and cache_dir(target) == tmp_path / "cache_low_contrast"


def test_the_lab_students_context_holds_every_lab_caption_whole():
    """The lab student reads 16 tokens (half the teacher's 32, for a faster step): every caption the
    lab makes, class names and templates, must end inside it (its EOS token is pooled)."""
    student = create_student(ModelConfig(name="lab-student"))
    captions = [template.format(c=name) for template in TEMPLATES for name in CLASSNAMES]
    tokens = student.tokenizer(captions)
    assert tokens.shape[1] == 16
    assert bool((tokens == student.config["text_cfg"]["eos_id"]).any(dim=1).all())
