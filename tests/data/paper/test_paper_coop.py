import json
import random
from collections import defaultdict

import pytest
from paper_fixtures import TO_TENSOR, write_classnames, write_image, write_split_dataset
from torch.utils.data import DataLoader

from clipdistill.data.classification import collate_labeled
from clipdistill.data.images import SkipCounter
from clipdistill.data.paper import build_dataset
from clipdistill.data.paper.coop import SPLIT_FILE_DATASETS

CLASSES = ["abyssinian", "bengal", "great_pyrenees", "pug", "sphynx"]
COUNTS = {"train": 5, "val": 2, "test": 3}


def make(root, name, classes=CLASSES, counts=COUNTS):
    spec = SPLIT_FILE_DATASETS[name]
    return write_split_dataset(root / spec.folder, spec.images, spec.split_file, classes, counts)


@pytest.mark.parametrize("name", sorted(SPLIT_FILE_DATASETS))
def test_split_file_datasets_read_coop_layout(tmp_path, name):
    split = make(tmp_path, name)
    spec = SPLIT_FILE_DATASETS[name]
    image_dir = tmp_path / spec.folder / spec.images
    for part, count in COUNTS.items():
        dataset = build_dataset(name, tmp_path, part, TO_TENSOR)
        assert len(dataset) == count * len(CLASSES)
        assert dataset.samples == [(str(image_dir / p), label) for p, label, _ in split[part]]
        assert dataset.classnames == ["abyssinian", "bengal", "great pyrenees", "pug", "sphynx"]
        assert dataset.templates == [spec.template] and "{c}" in spec.template
    image, label = dataset[0]
    assert tuple(image.shape) == (3, 8, 8) and label == 0


def test_prompt_templates_are_coops():
    assert SPLIT_FILE_DATASETS["oxford_pets"].template == "a photo of a {c}, a type of pet."
    assert SPLIT_FILE_DATASETS["dtd"].template == "{c} texture."
    assert SPLIT_FILE_DATASETS["ucf101"].template == "a photo of a person doing {c}."


def coop_fewshot(items, shots, seed):
    """CoOp's / Dassl's generate_fewshot_dataset after set_random_seed(seed), as they write it."""
    random.seed(seed)
    tracker = defaultdict(list)
    for item in items:
        tracker[item[1]].append(item)
    out = []
    for group in tracker.values():
        out.extend(random.sample(group, shots) if len(group) >= shots else group)
    return out, random.getstate()


def test_few_shot_sampler_matches_coop(tmp_path):
    make(tmp_path, "oxford_pets")
    train = build_dataset("oxford_pets", tmp_path, "train", TO_TENSOR).samples
    few = build_dataset("oxford_pets", tmp_path, "train", TO_TENSOR, shots=2, seed=3)
    expected, state = coop_fewshot(train, 2, 3)
    assert few.samples == expected
    assert sorted(label for _, label in few.samples) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert set(few.samples) <= set(train)
    assert build_dataset("oxford_pets", tmp_path, "train", TO_TENSOR, shots=2, seed=3).samples == few.samples
    assert build_dataset("oxford_pets", tmp_path, "train", TO_TENSOR, shots=2, seed=4).samples != few.samples
    # val keeps min(shots, 4) per class, drawn after train from the same generator, as CoOp does
    val = build_dataset("oxford_pets", tmp_path, "val", TO_TENSOR).samples
    random.setstate(state)
    assert build_dataset("oxford_pets", tmp_path, "val", TO_TENSOR, shots=2, seed=3).samples == [
        s for group in (val[i : i + 2] for i in range(0, len(val), 2)) for s in random.sample(group, 2)
    ]
    # a class with fewer images than shots keeps them all; test is never sampled
    assert len(build_dataset("oxford_pets", tmp_path, "train", TO_TENSOR, shots=16)) == 25
    assert len(build_dataset("oxford_pets", tmp_path, "test", TO_TENSOR, shots=1)) == 15


def test_base_new_halving(tmp_path):
    make(tmp_path, "dtd")
    base = build_dataset("dtd", tmp_path, "test", TO_TENSOR, subsample="base")
    new = build_dataset("dtd", tmp_path, "test", TO_TENSOR, subsample="new")
    assert base.classnames == ["abyssinian", "bengal", "great pyrenees"]  # ceil(5 / 2) = 3 base classes
    assert new.classnames == ["pug", "sphynx"]
    assert sorted({label for _, label in base.samples}) == [0, 1, 2]
    assert sorted({label for _, label in new.samples}) == [0, 1]  # relabelled from 0
    assert all("/pug/" in path for path, label in new.samples if label == 0)
    few_new = build_dataset("dtd", tmp_path, "train", TO_TENSOR, shots=1, subsample="new")
    assert sorted(label for _, label in few_new.samples) == [0, 1]


def test_eurosat_and_ucf_class_names(tmp_path):
    make(tmp_path, "eurosat", classes=["AnnualCrop", "SeaLake", "Highway or Road"])
    assert build_dataset("eurosat", tmp_path, "test", TO_TENSOR).classnames == [
        "Annual Crop Land",
        "Sea or Lake",
        "Highway or Road",
    ]
    make(tmp_path, "ucf101", classes=["Apply_Eye_Makeup", "Baby_Crawling"])
    assert build_dataset("ucf101", tmp_path, "test", TO_TENSOR).classnames == [
        "Apply Eye Makeup",
        "Baby Crawling",
    ]


def test_bad_image_is_a_counted_skip(tmp_path):
    make(tmp_path, "food101")
    (tmp_path / "food-101" / "images" / "pug" / "test_1.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    counter, labels = SkipCounter(), []
    dataset = build_dataset("food101", tmp_path, "test", TO_TENSOR)
    for batch in DataLoader(dataset, batch_size=4, collate_fn=collate_labeled):
        labels += batch["label"].tolist()
        for reason, key in batch["skipped"]:
            counter.add(reason, key)
    assert len(labels) == 14 and counter.total == 1 and counter.examples[0].endswith("pug/test_1.jpg")


def test_missing_and_malformed_split_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"oxford_pets: expected the folder .*oxford_pets"):
        build_dataset("oxford_pets", tmp_path, "train", TO_TENSOR)
    (tmp_path / "oxford_pets" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"expected the file .*split_zhou_OxfordPets.json"):
        build_dataset("oxford_pets", tmp_path, "train", TO_TENSOR)
    split_file = tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json"
    cases = [
        ("{not json", "not valid JSON"),
        (json.dumps({"train": []}), r'expected \{"train"'),
        (json.dumps({"train": [["a.jpg", 0]], "val": [], "test": []}), r"train\[0\] is \['a.jpg', 0\]"),
        (json.dumps({"train": [["a.jpg", 0, "a"], ["b.jpg", 0, "b"]], "val": [], "test": []}), "named both"),
        (json.dumps({"train": [["a.jpg", 1, "a"]], "val": [], "test": []}), r"missing \[0\]"),
    ]
    for text, message in cases:
        split_file.write_text(text)
        with pytest.raises(ValueError, match=message) as error:
            build_dataset("oxford_pets", tmp_path, "train", TO_TENSOR)
        assert str(split_file) in str(error.value)


def test_bad_arguments(tmp_path):
    make(tmp_path, "caltech101")
    with pytest.raises(ValueError, match="no split 'dev'"):
        build_dataset("caltech101", tmp_path, "dev", TO_TENSOR)
    with pytest.raises(ValueError, match="subsample must be one of all, base, new"):
        build_dataset("caltech101", tmp_path, "train", TO_TENSOR, subsample="novel")
    with pytest.raises(ValueError, match="unknown dataset 'pets'"):
        build_dataset("pets", tmp_path, "train", TO_TENSOR)


def imagenet(root):
    names = {"n02085620": "Chihuahua", "n01440764": "tench", "n01443537": "goldfish"}
    write_classnames(root / "imagenet" / "classnames.txt", names)
    for part, count in (("train", 4), ("val", 2)):
        for wnid in names:
            for i in range(count):
                write_image(root / "imagenet" / "images" / part / wnid / f"{i}.JPEG", i)
    return names


def test_imagenet(tmp_path):
    imagenet(tmp_path)
    train = build_dataset("imagenet", tmp_path, "train", TO_TENSOR)
    assert train.classnames == ["tench", "goldfish", "Chihuahua"]  # sorted wnid order
    assert len(train) == 12 and train.templates == ["a photo of a {c}."]
    assert train.samples[0] == (str(tmp_path / "imagenet/images/train/n01440764/0.JPEG"), 0)
    test = build_dataset("imagenet", tmp_path, "test", TO_TENSOR)
    val = build_dataset("imagenet", tmp_path, "val", TO_TENSOR, shots=1)
    assert val.samples == test.samples and len(test) == 6  # CoOp evaluates on val, which is also test
    few = build_dataset("imagenet", tmp_path, "train", TO_TENSOR, shots=2, subsample="base")
    assert few.classnames == ["tench", "goldfish"] and sorted(label for _, label in few.samples) == [
        0,
        0,
        1,
        1,
    ]
    write_image(tmp_path / "imagenet/images/val/n99999999/0.JPEG", 0)
    with pytest.raises(ValueError, match=r"n99999999 is not a class listed in .*classnames.txt"):
        build_dataset("imagenet", tmp_path, "val", TO_TENSOR)
    (tmp_path / "imagenet" / "classnames.txt").write_text("n01440764\n")
    with pytest.raises(ValueError, match="expected '<wnid> <class name>'"):
        build_dataset("imagenet", tmp_path, "train", TO_TENSOR)


def test_fgvc_aircraft(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]
    folder.mkdir()
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    for part, count in (("train", 3), ("val", 1), ("test", 2)):
        lines = []
        for label, variant in enumerate(variants):
            for i in range(count):
                image_id = f"{label}{part}{i}"
                write_image(folder / "images" / f"{image_id}.jpg", i)
                lines.append(f"{image_id} {variant}")
        (folder / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
    test = build_dataset("fgvc_aircraft", tmp_path, "test", TO_TENSOR)
    assert test.classnames == variants and len(test) == 6
    assert test.samples[-1] == (str(folder / "images" / "2test1.jpg"), 2)
    assert test.templates == ["a photo of a {c}, a type of aircraft."]
    assert len(build_dataset("fgvc_aircraft", tmp_path, "train", TO_TENSOR, shots=2)) == 6
    (folder / "images_variant_val.txt").write_text("1234 Boeing 999\n")
    with pytest.raises(ValueError, match=r"images_variant_val.txt line 1 is '1234 Boeing 999'"):
        build_dataset("fgvc_aircraft", tmp_path, "val", TO_TENSOR)
    (folder / "images_variant_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="images_variant_test.txt"):
        build_dataset("fgvc_aircraft", tmp_path, "test", TO_TENSOR)
