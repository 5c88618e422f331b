import json

import pytest
import torch
from paper_fixtures import TO_TENSOR, write_image
from torch.utils.data import DataLoader

from clipdistill.data.classification import collate_labeled
from clipdistill.data.paper import CaptionRetrievalSet, load_karpathy
from clipdistill.evaluate.retrieval import retrieval_recall


def coco(root):
    """Karpathy's dataset_coco.json layout: images under <filepath>/<filename>, splits incl. restval."""
    entries = []
    for i, (split, filepath) in enumerate(
        [
            ("train", "train2014"),
            ("restval", "val2014"),
            ("val", "val2014"),
            ("test", "val2014"),
            ("test", "val2014"),
        ]
    ):
        filename = f"COCO_{filepath}_{i:012d}.jpg"
        write_image(root / filepath / filename, i)
        sentences = [
            {"raw": f"image {i} caption {j} ", "tokens": ["image"], "imgid": i} for j in range(i % 2 + 1)
        ]
        entries.append(
            {"filepath": filepath, "filename": filename, "split": split, "sentences": sentences, "imgid": i}
        )
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path


def test_load_karpathy_coco(tmp_path):
    path = coco(tmp_path)
    train = load_karpathy(path, tmp_path, "train")
    assert [p for p, _ in train] == [
        str(tmp_path / "train2014/COCO_train2014_000000000000.jpg"),
        str(tmp_path / "val2014/COCO_val2014_000000000001.jpg"),  # restval counts as train
    ]
    assert train[1][1] == ["image 1 caption 0", "image 1 caption 1"]
    assert len(load_karpathy(path, tmp_path, "val")) == 1 and len(load_karpathy(path, tmp_path, "test")) == 2


def test_load_karpathy_flickr_has_no_filepath(tmp_path):
    write_image(tmp_path / "flickr30k-images" / "1000092795.jpg", 0)
    entry = {"filename": "1000092795.jpg", "split": "test", "sentences": [{"raw": "Two young guys."}]}
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": [entry]}))
    assert load_karpathy(path, tmp_path / "flickr30k-images", "test") == [
        (str(tmp_path / "flickr30k-images" / "1000092795.jpg"), ["Two young guys."])
    ]


def test_load_karpathy_errors(tmp_path):
    path = tmp_path / "dataset_coco.json"
    with pytest.raises(FileNotFoundError, match="expected Karpathy's split file at .*dataset_coco.json"):
        load_karpathy(path, tmp_path, "test")
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(FileNotFoundError, match="expected the image folder at .*nowhere"):
        load_karpathy(path, tmp_path / "nowhere", "test")
    with pytest.raises(ValueError, match="no split 'restval'"):
        load_karpathy(path, tmp_path, "restval")
    with pytest.raises(ValueError, match="no images in split 'test'"):
        load_karpathy(path, tmp_path, "test")
    path.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": ["a dog"]}]}))
    with pytest.raises(ValueError, match=r"dataset_coco.json: images\[0\] does not match"):
        load_karpathy(path, tmp_path, "test")
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match='expected {"images"'):
        load_karpathy(path, tmp_path, "test")


def test_retrieval_set_feeds_retrieval_recall(tmp_path):
    path = coco(tmp_path)
    (tmp_path / "val2014" / "COCO_val2014_000000000001.jpg").write_bytes(b"broken")
    dataset = CaptionRetrievalSet(path, tmp_path, "train", TO_TENSOR)
    assert dataset.captions == ["image 0 caption 0", "image 1 caption 0", "image 1 caption 1"]
    assert dataset.text_to_image.tolist() == [0, 1, 1]
    (batch,) = DataLoader(dataset, batch_size=4, collate_fn=collate_labeled)
    assert batch["label"].tolist() == [0] and batch["skipped"][0][0] == "unreadable"
    captions, text_to_image = dataset.targets(batch["label"].tolist())
    assert captions == ["image 0 caption 0"] and text_to_image.tolist() == [0]
    features = torch.eye(2)
    recall = retrieval_recall(features[:1], features[:1], text_to_image=text_to_image, ks=(1,))
    assert recall["image_retrieval_recall@1"] == 100.0
    test = CaptionRetrievalSet(path, tmp_path, "test", TO_TENSOR)
    assert test.targets([1, 0])[1].tolist() == [0, 1, 1]  # rows: image 4 (1 caption), image 3 (2)
