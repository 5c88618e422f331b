import inspect

from clipdistill.data.paper import DATASET_TITLES, DATASETS, SUITES, build_dataset


def test_suites_in_paper_order():
    assert SUITES["base_to_novel"] == [
        "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
        "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
    ]  # fmt: skip
    assert SUITES["cross_dataset"] == SUITES["base_to_novel"][1:]
    assert SUITES["domain_generalization"] == [
        "imagenet",
        "imagenet_v2",
        "imagenet_sketch",
        "imagenet_a",
        "imagenet_r",
    ]
    assert SUITES["linear_probe"] == ["cifar10", "cifar100", "stl10"]
    assert all(name in DATASETS for suite in SUITES.values() for name in suite)


def test_titles_and_signature():
    assert DATASET_TITLES.keys() == DATASETS.keys()
    assert DATASET_TITLES["oxford_flowers"] == "Flowers102" and DATASET_TITLES["oxford_pets"] == "OxfordPets"
    parameters = inspect.signature(build_dataset).parameters
    assert list(parameters) == ["name", "root", "split", "transform", "shots", "seed", "subsample"]
    assert [parameters[k].default for k in ("shots", "seed", "subsample")] == [0, 1, "all"]
