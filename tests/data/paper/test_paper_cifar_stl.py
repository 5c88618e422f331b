import codecs
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from paper_fixtures import TO_TENSOR

from clipdistill.data.paper import build_dataset
from clipdistill.data.paper.cifar_stl import CIFAR_TEMPLATES, STL10_TEMPLATES


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 wrote its str (BINSTRING), not through `_codecs.encode` as Python 3 does."""

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes}


def py2_pickle(obj, path):
    """Write `obj` as CIFAR's Python 2 files are: protocol 2, str as BINSTRING, numpy under `numpy.core`."""
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    assert b"_codecs" not in buffer.getvalue()
    path.write_bytes(buffer.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def cifar10(root, per_batch=6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [b"airplane", b"automobile", b"bird"]
    py2_pickle({b"label_names": names, b"num_cases_per_batch": per_batch}, folder / "batches.meta")
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [i % 3 for i in range(per_batch)]
        py2_pickle({b"batch_label": name.encode(), b"data": data, b"labels": labels}, folder / name)
        batches[name] = (data, labels)
    return batches


def test_cifar10_splits_pixels_and_classes(tmp_path):
    batches = cifar10(tmp_path)
    test = build_dataset("cifar10", tmp_path, "test", TO_TENSOR)
    assert test.classnames == ["airplane", "automobile", "bird"] and test.templates == CIFAR_TEMPLATES
    assert len(test) == 6 and test.samples == [(i, i % 3) for i in range(6)]
    image, label = test[4]
    data, labels = batches["test_batch"]
    assert label == labels[4] and torch.equal(image, torch.from_numpy(data[4].reshape(3, 32, 32)))
    train = build_dataset("cifar10", tmp_path, "train", TO_TENSOR)
    val = build_dataset("cifar10", tmp_path, "val", TO_TENSOR)
    trainval = build_dataset("cifar10", tmp_path, "trainval", TO_TENSOR)
    assert len(trainval) == 30 and len(val) == 3 and len(train) == 27  # 10% of each class held out
    assert sorted(label for _, label in val.samples) == [0, 1, 2]
    assert sorted(train.samples + val.samples) == trainval.samples
    row, label = val.samples[0]
    image, _ = val[0]
    data, labels = batches[f"data_batch_{row // 6 + 1}"]
    assert label == labels[row % 6] and torch.equal(image, torch.from_numpy(data[row % 6].reshape(3, 32, 32)))
    few = build_dataset("cifar10", tmp_path, "train", TO_TENSOR, shots=2, subsample="base")
    assert few.classnames == ["airplane", "automobile"] and sorted(label for _, label in few.samples) == [
        0,
        0,
        1,
        1,
    ]


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    with open(folder / "meta", "wb") as f:  # a Python 3 pickle (str keys, protocol 5) reads the same
        pickle.dump(
            {"fine_label_names": ["aquarium_fish", "maple_tree"], "coarse_label_names": ["fish"]}, f, 5
        )
    for part, n in (("train", 20), ("test", 4)):
        batch = {b"data": np.full((n, 3072), 7, np.uint8), b"fine_labels": [i % 2 for i in range(n)]}
        if part == "train":
            py2_pickle(batch, folder / part)
        else:  # Python 3's protocol 2 writes bytes through _codecs.encode(..., "latin1")
            (folder / part).write_bytes(pickle.dumps(batch, protocol=2))
    test = build_dataset("cifar100", tmp_path, "test", TO_TENSOR)
    assert test.classnames == ["aquarium fish", "maple tree"] and len(test) == 4
    assert len(build_dataset("cifar100", tmp_path, "val", TO_TENSOR)) == 2


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


class OtherCodec:
    def __reduce__(self):
        return (codecs.encode, ("a", "unicode_escape"))


def test_cifar_pickles_are_read_safely(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({b"data": Exploit()}, protocol=2)
    )
    with pytest.raises(
        ValueError, match=r"test_batch is not a CIFAR python pickle \(refusing to load posix.system"
    ):
        build_dataset("cifar10", tmp_path, "test", TO_TENSOR)
    assert not (tmp_path / "pwned").exists()
    # bytes in a protocol 2 pickle go through _codecs.encode; only its latin1 use is allowed
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(OtherCodec(), protocol=2))
    with pytest.raises(ValueError, match="refusing _codecs.encode with codec 'unicode_escape'"):
        build_dataset("cifar10", tmp_path, "test", TO_TENSOR)
    py2_pickle(
        {b"data": np.zeros((2, 5), np.uint8), b"labels": [0, 1]},
        tmp_path / "cifar-10-batches-py" / "test_batch",
    )
    with pytest.raises(ValueError, match="expected 'data', a uint8 N x 3072 array"):
        build_dataset("cifar10", tmp_path, "test", TO_TENSOR)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"cifar10: expected the file .*test_batch \(CIFAR's python version"
    ):
        build_dataset("cifar10", tmp_path, "test", TO_TENSOR)


def test_stl10_binaries(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    (folder / "class_names.txt").write_text("airplane\nbird\ncar\n")
    rng = np.random.default_rng(0)
    images = {}
    for part, n in (("train", 10), ("test", 3)):
        images[part] = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)
        # STL-10 stores each image channel by channel, each channel column-major
        images[part].transpose(0, 3, 2, 1).tofile(folder / f"{part}_X.bin")
        np.array([i % 3 + 1 for i in range(n)], np.uint8).tofile(folder / f"{part}_y.bin")
    test = build_dataset("stl10", tmp_path, "test", TO_TENSOR)
    assert test.classnames == ["airplane", "bird", "car"] and test.templates == STL10_TEMPLATES
    assert test.samples == [(0, 0), (1, 1), (2, 2)]
    image, _ = test[1]
    assert torch.equal(image, torch.from_numpy(images["test"][1]).permute(2, 0, 1))  # rows stay rows
    assert len(build_dataset("stl10", tmp_path, "train", TO_TENSOR)) == 7  # one of each class held out
    np.array([1, 2, 4], np.uint8).tofile(folder / "test_y.bin")
    with pytest.raises(ValueError, match=r"test_y.bin: expected 3 labels in 1..3"):
        build_dataset("stl10", tmp_path, "test", TO_TENSOR)
    (folder / "test_X.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="expected a multiple of 96"):
        build_dataset("stl10", tmp_path, "test", TO_TENSOR)
