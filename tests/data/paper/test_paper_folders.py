import pytest
from paper_fixtures import TO_TENSOR, write_image

from clipdistill.data.paper import build_dataset


def test_image_folder_splits(tmp_path):
    for part, count in (("train", 3), ("val", 1), ("test", 2)):
        for cls in ("golden_retriever", "ant", "zebra"):
            for i in range(count):
                write_image(tmp_path / part / cls / f"{i}.png", i)
    train = build_dataset("image_folder", tmp_path, "train", TO_TENSOR)
    assert train.classnames == ["ant", "golden retriever", "zebra"] and train.templates == [
        "a photo of a {c}."
    ]
    assert len(train) == 9 and train.samples[3] == (str(tmp_path / "train/golden_retriever/0.png"), 1)
    assert len(build_dataset("image_folder", tmp_path, "val", TO_TENSOR)) == 3
    write_image(tmp_path / "val" / "ant" / "night" / "0.png", 0)  # a folder inside a class: its images too
    assert build_dataset("image_folder", tmp_path, "val", TO_TENSOR).samples[:2] == [
        (str(tmp_path / "val/ant/0.png"), 0), (str(tmp_path / "val/ant/night/0.png"), 0)]  # fmt: skip
    few = build_dataset("image_folder", tmp_path, "train", TO_TENSOR, shots=1, subsample="new")
    assert few.classnames == ["zebra"] and len(few) == 1
    write_image(tmp_path / "test" / "yak" / "0.png", 0)
    with pytest.raises(ValueError, match=r"test/yak is not a class listed in .*train"):
        build_dataset("image_folder", tmp_path, "test", TO_TENSOR)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image_folder: expected the folder .*train \(image folders"):
        build_dataset("image_folder", tmp_path, "train", TO_TENSOR)
    write_image(tmp_path / "train" / "ant" / "0.png", 0)
    with pytest.raises(FileNotFoundError, match=r"expected the folder .*val"):
        build_dataset("image_folder", tmp_path, "val", TO_TENSOR)
    write_image(tmp_path / "test" / "0.png", 0)  # images not sorted into class folders
    with pytest.raises(
        ValueError, match=r"no class folders in .*test; expected one sub-folder of images per class"
    ):
        build_dataset("image_folder", tmp_path, "test", TO_TENSOR)
