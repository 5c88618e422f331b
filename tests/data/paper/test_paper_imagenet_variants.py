import pytest
from paper_fixtures import TO_TENSOR, write_classnames, write_image

from clipdistill.data.paper import build_dataset

NAMES = {
    "n01440764": "tench",
    "n01443537": "goldfish",
    "n01484850": "great_white_shark",
    "n01491361": "tiger shark",
}


def test_imagenet_v2_numbered_folders(tmp_path):
    folder = tmp_path / "imagenetv2"
    write_classnames(folder / "classnames.txt", NAMES)
    for label in range(len(NAMES)):
        for i in range(2):
            write_image(folder / "imagenetv2-matched-frequency-format-val" / str(label) / f"{i}.jpeg", i)
    test = build_dataset("imagenet_v2", tmp_path, "test", TO_TENSOR)
    assert test.classnames == ["tench", "goldfish", "great white shark", "tiger shark"]
    assert len(test) == 8 and [label for _, label in test.samples] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert test.imagenet_indices == [0, 1, 2, 3] and test.templates == ["a photo of a {c}."]


def test_imagenet_sketch(tmp_path):
    write_classnames(tmp_path / "imagenet-sketch" / "classnames.txt", NAMES)
    for wnid in NAMES:
        write_image(tmp_path / "imagenet-sketch" / "images" / wnid / "sketch_0.JPEG", 1)
    test = build_dataset("imagenet_sketch", tmp_path, "test", TO_TENSOR)
    assert len(test) == 4 and test.classnames[2] == "great white shark"


@pytest.mark.parametrize(
    ("name", "folder", "images"),
    [
        ("imagenet_a", "imagenet-adversarial", "imagenet-a"),
        ("imagenet_r", "imagenet-rendition", "imagenet-r"),
    ],
)
def test_imagenet_a_and_r_class_subsets(tmp_path, name, folder, images):
    write_classnames(tmp_path / folder / "classnames.txt", NAMES)
    for wnid in ("n01491361", "n01443537"):  # a subset of the classes, as -A and -R hold 200 of 1000
        for i in range(3):
            write_image(tmp_path / folder / images / wnid / f"{i}.jpg", i)
    (tmp_path / folder / images / "README.txt").write_text("not a class")
    test = build_dataset(name, tmp_path, "test", TO_TENSOR)
    assert test.classnames == ["goldfish", "tiger shark"]
    assert test.imagenet_indices == [1, 3]  # their labels in the 1000-way (here 4-way) ImageNet reader
    assert [label for _, label in test.samples] == [0, 0, 0, 1, 1, 1]
    new = build_dataset(name, tmp_path, "test", TO_TENSOR, subsample="new")
    assert new.classnames == ["tiger shark"] and new.imagenet_indices == [3]
    with pytest.raises(ValueError, match="no split 'train'; it has test"):
        build_dataset(name, tmp_path, "train", TO_TENSOR)
    write_image(tmp_path / folder / images / "n09999999" / "0.jpg", 0)
    with pytest.raises(ValueError, match=r"\['n09999999'\] .* not listed in .*classnames.txt"):
        build_dataset(name, tmp_path, "test", TO_TENSOR)


def test_missing_variant_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"imagenet_r: expected the folder .*imagenet-rendition \("):
        build_dataset("imagenet_r", tmp_path, "test", TO_TENSOR)
    write_classnames(tmp_path / "imagenetv2" / "classnames.txt", NAMES)
    with pytest.raises(FileNotFoundError, match="imagenetv2-matched-frequency-format-val"):
        build_dataset("imagenet_v2", tmp_path, "test", TO_TENSOR)
