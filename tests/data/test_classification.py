import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from clipdistill.data.classification import (
    ArraySet,
    ImageFolderSet,
    collate_labeled,
    load_classnames_templates,
)
from clipdistill.data.images import SkipCounter

TO_TENSOR = T.PILToTensor()  # uint8, no resizing: pixels can be compared exactly


@pytest.fixture
def folder(tmp_path):
    """Two classes, created out of order; one corrupt image and one non-image file."""
    for cls, value in [("sea_lion", 200), ("cat", 50)]:
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("L", (6, 4), value + i).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "cat" / "README.txt").write_text("not an image")
    (tmp_path / ".cache").mkdir()
    return tmp_path


def test_image_folder_classes_labels_and_bad_images(folder):
    dataset = ImageFolderSet(folder, TO_TENSOR)
    assert dataset.classnames == ["cat", "sea lion"]
    assert dataset.templates == ["a photo of a {c}."]
    assert len(dataset) == 7  # README.txt is not listed
    counter, labels, values = SkipCounter(), [], []
    for batch in DataLoader(dataset, batch_size=3, collate_fn=collate_labeled):
        labels += batch["label"].tolist()
        values += batch["image"][:, 0, 0, 0].tolist()
        for reason, key in batch["skipped"]:
            counter.add(reason, key)
    assert labels == [0, 0, 0, 1, 1, 1]
    assert values == [50, 51, 52, 200, 201, 202]  # grey images come out as 3 equal channels
    assert counter.by_reason == {"truncated": 1} and counter.examples[0].endswith("broken.jpg")


def test_image_folder_custom_names_and_errors(folder, tmp_path_factory):
    dataset = ImageFolderSet(folder, TO_TENSOR, classnames=["kitty", "sea lion"], templates=["art of {c}"])
    assert dataset.classnames == ["kitty", "sea lion"] and dataset.templates == ["art of {c}"]
    with pytest.raises(ValueError, match="1 classnames given for 2 class folders"):
        ImageFolderSet(folder, TO_TENSOR, classnames=["kitty"])
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolderSet(tmp_path_factory.mktemp("empty"), TO_TENSOR)


def test_array_set_grey_rgb_and_alpha(tmp_path):
    grey = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    dataset = ArraySet(grey, np.array([1, 0]), ["zero", "one"], TO_TENSOR)
    image, label = dataset[0]
    assert label == 1 and image.shape == (3, 3, 4) and torch.equal(image[2], torch.from_numpy(grey[0]))

    rgba = np.zeros((1, 2, 2, 4), dtype=np.uint8)
    rgba[0, 0, 0] = [10, 20, 30, 255]  # one opaque pixel, the rest transparent -> white
    np.save(tmp_path / "x.npy", rgba)
    np.save(tmp_path / "y.npy", np.array([0]))
    image, label = ArraySet(tmp_path / "x.npy", tmp_path / "y.npy", ["only"], TO_TENSOR)[0]
    assert image[:, 0, 0].tolist() == [10, 20, 30] and image[:, 1, 1].tolist() == [255, 255, 255]

    single = np.full((1, 2, 2, 1), 9, dtype=np.uint8)
    assert ArraySet(single, np.array([0]), ["only"], TO_TENSOR)[0][0].unique().tolist() == [9]


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (np.zeros((2, 4, 4), dtype=np.float32), [0, 1], "expected uint8"),
        (np.zeros((2, 4, 4, 2), dtype=np.uint8), [0, 1], "C = 1, 3, 4"),
        (np.zeros((2, 4, 4), dtype=np.uint8), [0], "expected 2 integers"),
        (np.zeros((2, 4, 4), dtype=np.uint8), [0, 2], "outside 0..1"),
    ],
)
def test_array_set_rejects_bad_arrays(images, labels, match):
    with pytest.raises(ValueError, match=match):
        ArraySet(images, np.array(labels), ["a", "b"], TO_TENSOR)


def _write(path, data) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_load_single_file(tmp_path):
    path = _write(tmp_path / "c.json", {"classnames": ["cat", "dog"], "templates": ["a {c}.", "the {c}"]})
    assert load_classnames_templates(path) == (["cat", "dog"], ["a {c}.", "the {c}"])


def test_load_clip_benchmark_two_files(tmp_path):
    names = _write(tmp_path / "en_classnames.json", {"cifar10": ["airplane", "car"], "mnist": ["0", "1"]})
    templates = _write(tmp_path / "en_templates.json", {"cifar10": ["a blurry photo of a {c}."]})
    assert load_classnames_templates(names, dataset="cifar10", templates_path=templates) == (
        ["airplane", "car"],
        ["a blurry photo of a {c}."],
    )
    with pytest.raises(ValueError, match=r"no entry for dataset 'mnist'; it has \['cifar10'\]"):
        load_classnames_templates(names, dataset="mnist", templates_path=templates)
    with pytest.raises(ValueError, match="templates_path"):
        load_classnames_templates(names, dataset="cifar10")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ({"classnames": ["cat"]}, r'expected \{"classnames": \[...\], "templates": \[...\]\}'),
        (["cat", "dog"], "expected"),
        ({"classnames": [], "templates": ["a {c}"]}, "non-empty list of non-empty strings"),
        ({"classnames": ["cat"], "templates": "a {c}"}, "templates must be a non-empty list"),
        (
            {"classnames": ["cat"], "templates": ["a {c}", "a photo of a {}."]},
            "'a photo of a {}.' has no {c}",
        ),
    ],
)
def test_load_errors_name_the_file_and_the_problem(tmp_path, content, match):
    path = _write(tmp_path / "bad.json", content)
    with pytest.raises(ValueError, match=match) as info:
        load_classnames_templates(path)
    assert path in str(info.value)


def test_sets_reject_templates_without_placeholder(folder):
    with pytest.raises(ValueError, match="has no {c}"):
        ImageFolderSet(folder, TO_TENSOR, templates=["a photo"])
