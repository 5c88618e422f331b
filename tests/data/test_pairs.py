import csv
import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

from clipdistill.config import DataConfig
from clipdistill.data import pairs
from clipdistill.data.images import SkipCounter
from clipdistill.data.pairs import (
    PairsDataset,
    ShardBatches,
    ShardChangedError,
    ShardIndex,
    collate_pairs,
    expand_urls,
    shard_order,
)
from clipdistill.data.sources import ShardPairs
from clipdistill.models.factory import Preprocess
from conftest import write_tar

TRANSFORM = T.Compose([T.Resize((8, 8)), T.ToTensor()])


def _image_bytes(seed: int, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


# ---- tables ---------------------------------------------------------------------------------------

ROWS = [  # (image, caption, what the dataset must make of it)
    ("img0.png", "a red square", "ok"),
    ("img1.png", 'a caption, with "quotes"\nand a newline', "ok"),
    ("missing.png", "gone", "missing_file"),
    ("img3.png", "   ", "empty_caption"),
    ("sub/img4.png", "nested", "ok"),
]


@pytest.fixture
def table_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    for i, (image, _, _) in enumerate(ROWS):
        if image != "missing.png":
            (tmp_path / image).write_bytes(_image_bytes(i))
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title", "uid"])
        writer.writerows([image, caption, f"u{i}"] for i, (image, caption, _) in enumerate(ROWS))
    return tmp_path


def test_csv_samples_and_bad_rows(table_dir):
    dataset = PairsDataset(table_dir / "pairs.csv", TRANSFORM)
    assert len(dataset) == len(ROWS)
    for i, (_, caption, outcome) in enumerate(ROWS):
        sample = dataset[i]
        if outcome == "ok":
            assert sample["text"] == caption.strip() and sample["index"] == i and sample["id"] == str(i)
            assert sample["image"].shape == (3, 8, 8)
        else:
            assert sample == {"bad": outcome, "id": str(i), "index": i}


def test_root_and_id_key(table_dir, tmp_path_factory):
    moved = tmp_path_factory.mktemp("elsewhere")
    (moved / "pairs.csv").write_bytes((table_dir / "pairs.csv").read_bytes())
    assert PairsDataset(moved / "pairs.csv", TRANSFORM)[0]["bad"] == "missing_file"  # relative to the table
    dataset = PairsDataset(moved / "pairs.csv", TRANSFORM, id_key="uid", root=table_dir)
    assert dataset[0]["id"] == "u0" and dataset[4]["text"] == "nested"


def test_missing_column_names_file_columns_and_option(table_dir):
    with pytest.raises(ValueError) as info:
        PairsDataset(table_dir / "pairs.csv", TRANSFORM, caption_key="caption")
    message = str(info.value)
    for part in ("pairs.csv", "'caption'", "['filepath', 'title', 'uid']", "--data.caption_key"):
        assert part in message


def test_tsv_and_custom_separator(tmp_path):
    (tmp_path / "a.png").write_bytes(_image_bytes(0))
    (tmp_path / "pairs.tsv").write_text("path\tcaption\na.png\tone, two; three\n")
    (tmp_path / "pairs.txt").write_text("path;caption\na.png;four, five\n")
    tsv = PairsDataset(tmp_path / "pairs.tsv", TRANSFORM, image_key="path", caption_key="caption")
    assert tsv[0]["text"] == "one, two; three"
    semi = PairsDataset(tmp_path / "pairs.txt", TRANSFORM, image_key="path", caption_key="caption", sep=";")
    assert semi[0]["text"] == "four, five"


def test_parquet_keeps_only_needed_columns_as_strings(table_dir):
    table = pa.table(
        {
            "filepath": [image for image, _, _ in ROWS],
            "title": [caption for _, caption, _ in ROWS[:-1]] + [None],
            "key": [100 + i for i in range(len(ROWS))],
            "unused": [1.0] * len(ROWS),
        }
    )
    pq.write_table(table, table_dir / "pairs.parquet")
    dataset = PairsDataset(table_dir / "pairs.parquet", TRANSFORM, id_key="key")
    assert dataset[0]["id"] == "100" and dataset[1]["text"] == ROWS[1][1]
    assert dataset[4] == {"bad": "empty_caption", "id": "104", "index": 4}  # null caption
    with pytest.raises(ValueError, match="--data.image_key"):
        PairsDataset(table_dir / "pairs.parquet", TRANSFORM, image_key="url")


def test_duplicate_ids_are_named(table_dir):
    with open(table_dir / "dup.csv", "w") as f:
        f.write("filepath,title,uid\nimg0.png,a,x1\nimg1.png,b,x2\nimg0.png,c,x1\n")
    with pytest.raises(ValueError, match=r"1 duplicate ids in column 'uid', e.g. \['x1'\]"):
        PairsDataset(table_dir / "dup.csv", TRANSFORM, id_key="uid")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_collate_separates_bad_samples_across_workers(table_dir, num_workers):
    dataset = PairsDataset(table_dir / "pairs.csv", TRANSFORM)
    loader = DataLoader(dataset, batch_size=2, num_workers=num_workers, collate_fn=collate_pairs)
    counter, indices, texts = SkipCounter(), [], []
    for batch in loader:
        assert len(batch["image"]) == len(batch["text"]) == len(batch["index"]) == len(batch["id"])
        assert batch["index"].dtype == torch.long and batch["image"].shape[1:] in [(3, 8, 8), ()]
        indices += batch["index"].tolist()
        texts += batch["text"]
        for reason, key in batch["skipped"]:
            counter.add(reason, key)
    assert indices == [0, 1, 4] and texts[2] == "nested"
    assert counter.as_dict() == {
        "total": 2,
        "by_reason": {"missing_file": 1, "empty_caption": 1},
        "examples": ["2", "3"],
    }


def test_collate_of_an_all_bad_batch():
    batch = collate_pairs([{"bad": "truncated", "id": "k", "index": 3}])
    assert batch["image"].numel() == 0 and batch["text"] == [] and batch["index"].tolist() == []
    assert batch["skipped"] == [("truncated", "k")]


# ---- webdataset shards ----------------------------------------------------------------------------


def _sample(key: str, seed: int, caption: bytes | None = None, image: bool = True) -> list[tuple[str, bytes]]:
    members = [(f"{key}.jpg", _image_bytes(seed, "JPEG"))] if image else []
    members.append((f"{key}.txt", caption if caption is not None else f"caption of {key}".encode()))
    members.append((f"{key}.json", b"{}"))  # extra members are ignored
    return members


@pytest.fixture
def shards(tmp_path):
    """3 shards of 4 records: 9 good, one with no image, one with no caption, one with an empty caption."""
    records = []
    for s in range(3):
        members = []
        for i in range(4):
            key = f"part/{s:03d}_{i:02d}"
            if (s, i) == (0, 3):
                members += _sample(key, 0, image=False)
                records.append((key, "missing_image"))
            elif (s, i) == (1, 3):
                members += [(f"{key}.jpg", _image_bytes(0, "JPEG"))]
                records.append((key, "missing_caption"))
            elif (s, i) == (2, 0):
                members += _sample(key, 0, caption=b"  ")
                records.append((key, "empty_caption"))
            else:
                members += _sample(key, 10 * s + i)
                records.append((key, "ok"))
        write_tar(tmp_path / f"shard-{s:03d}.tar", members)
    return str(tmp_path / "shard-{000..002}.tar"), records


def _stream(dataset) -> list[tuple[str, int, str]]:
    """(id, index, outcome) of every record, checking each good sample on the way."""
    out = []
    for sample in dataset:
        if "bad" not in sample:
            assert sample["image"].shape == (3, 8, 8) and sample["text"] == f"caption of {sample['id']}"
        out.append((sample["id"], sample["index"], sample.get("bad", "ok")))
    return out


def _records(urls: str, order=None, start: int = 0, keep=None, index=None) -> ShardBatches:
    """The record stream of `order`'s shards (batches of one record, uncollated), from record `start`."""
    shards = expand_urls(urls)
    index = index or ShardIndex.scan(shards)
    order = list(range(len(shards))) if order is None else order
    masks = keep or (lambda i: None)
    kept = index.counts if keep is None else np.array([int(keep(i).sum()) for i in range(len(shards))])
    return ShardBatches(shards, index, order, kept, masks, 1, start, TRANSFORM, lambda samples: samples[0])


def _keys(dataset) -> list[str]:
    return [key for key, _, _ in _stream(dataset)]


def test_expand_urls():
    assert expand_urls("d/{000..002}.tar") == ["d/000.tar", "d/001.tar", "d/002.tar"]
    assert expand_urls("a/{0..1}.tar::b/x.tar:: ") == ["a/0.tar", "a/1.tar", "b/x.tar"]


def test_reads_every_record_in_order_and_indexes_the_shards(shards):
    urls, records = shards
    stream = _stream(_records(urls))
    assert stream == [(key, i, outcome) for i, (key, outcome) in enumerate(records)]
    index = ShardIndex.scan(expand_urls(urls))
    assert index.counts.tolist() == [4, 4, 4] and index.offsets.tolist() == [0, 4, 8]
    assert len(set(index.digests.tolist())) == 3


def _ids(urls, size: int, rank: int = 0, world_size: int = 1, workers: int = 0) -> list[list[str]]:
    """The record ids of every batch of `size` one rank builds in an epoch, shards in order [2, 0, 1]."""
    index = ShardIndex.scan(expand_urls(urls))
    dataset = ShardBatches(
        expand_urls(urls), index, [2, 0, 1], index.counts, lambda i: None, size, 0, TRANSFORM,
        lambda samples: [s["id"] for s in samples], rank=rank, world_size=world_size,
    )  # fmt: skip
    return list(DataLoader(dataset, batch_size=None, num_workers=workers))


def test_each_rank_takes_its_slice_of_every_global_batch_of_one_stream(shards):
    urls, records = shards
    one = _ids(urls, 4)
    two = [_ids(urls, 2, rank, 2) for rank in range(2)]
    assert len(one) == 3 and sorted(sum(one, [])) == sorted(key for key, _ in records)
    assert [a + b for a, b in zip(*two, strict=True)] == one
    assert _ids(urls, 2, 1, 2, workers=2) == two[1]
    three = [_ids(urls, 1, rank, 3) for rank in range(3)]  # more ranks than some shards have records
    assert [a + b + c for a, b, c in zip(*three, strict=True)] == _ids(urls, 3)


def test_shuffled_order_is_fixed_by_seed_and_epoch():
    assert shard_order(50, 3, 1) == shard_order(50, 3, 1)
    orders = {tuple(shard_order(50, 3, epoch)) for epoch in range(6)}
    assert len(orders) == 6 and all(sorted(o) == list(range(50)) for o in orders)


@pytest.mark.parametrize("skip", [0, 3, 5, 11])
def test_start_resumes_exactly_without_decoding_skipped_images(shards, monkeypatch, skip):
    urls, _ = shards
    order = [2, 0, 1]
    full = _stream(_records(urls, order))
    decoded = []
    decode = pairs.decode_image
    monkeypatch.setattr(
        pairs, "decode_image", lambda source, name, min_side: decoded.append(name) or decode(source)
    )
    resumed = _stream(_records(urls, order, start=skip))
    assert resumed == full[skip:]
    assert decoded == [key for key, _, outcome in full[skip:] if outcome == "ok"]


def test_kept_records_only_and_their_cache_rows(shards):
    urls, records = shards
    masks = [np.array([True, False, True, False]), np.zeros(4, bool), np.array([False, True, True, True])]
    stream = _stream(_records(urls, keep=lambda i: masks[i]))
    rows = np.flatnonzero(np.concatenate(masks))
    assert [(key, index) for key, index, _ in stream] == [(records[r][0], r) for r in rows]


def test_a_changed_shard_is_refused(shards, tmp_path):
    urls, _ = shards
    index = ShardIndex.scan(expand_urls(urls))
    write_tar(tmp_path / "shard-001.tar", _sample("other/000", 0) + _sample("other/001", 1))
    with pytest.raises(ShardChangedError, match="shard-001.tar changed"):
        _stream(_records(urls, index=index))


def _cut_shard(path, keep_bytes: int) -> None:
    path.write_bytes(path.read_bytes()[:keep_bytes])


def _member(path, name: str) -> tarfile.TarInfo:
    with tarfile.open(path) as tar:
        return tar.getmember(name)


def test_truncated_shard_yields_good_prefix_then_a_bad_record(shards, tmp_path):
    urls, records = shards
    shard = tmp_path / "shard-000.tar"
    image = _member(shard, "part/000_02.jpg")
    _cut_shard(shard, image.offset_data + image.size // 2)  # mid-way through sample 2's image
    stream = _stream(_records(urls))
    assert [key for key, _, _ in stream[:2]] == ["part/000_00", "part/000_01"]
    assert stream[2] == (str(shard), 2, "truncated_shard")
    assert [key for key, _, _ in stream[3:]] == [key for key, _ in records[4:]]  # the next shards still come
    assert [index for _, index, _ in stream[3:]] == list(range(3, 11))  # rows: the cut shard counts 3
    for skip in (2, 3):  # the bad record holds its place when resuming, too
        assert _stream(_records(urls, start=skip)) == stream[skip:]


def test_shard_cut_between_members_is_still_caught(shards, tmp_path):
    urls, _ = shards
    shard = tmp_path / "shard-002.tar"
    last = _member(shard, "part/002_03.json")
    _cut_shard(shard, last.offset_data + tarfile.BLOCKSIZE)  # every member whole, end-of-archive gone
    stream = _stream(_records(urls))
    # the last sample may have lost members past the cut, so it is replaced by the bad record
    assert [key for key, _, _ in stream[-3:]] == ["part/002_01", "part/002_02", str(shard)]
    assert stream[-1][2] == "truncated_shard"


@pytest.mark.parametrize("cut", [0, 100, 700])  # empty, inside the first header, inside the first image
def test_a_shard_without_a_readable_sample_is_unreadable_and_a_reader_refuses_it(shards, tmp_path, cut):
    urls, _ = shards
    index = ShardIndex.scan(expand_urls(urls))
    shard = tmp_path / "shard-001.tar"
    _cut_shard(shard, cut)
    scanned = ShardIndex.scan(expand_urls(urls))
    assert scanned.unreadable.tolist() == [1] and scanned.counts.tolist() == [4, 0, 4]
    if cut < 700:  # no tar left to open: the index that read it says it changed
        with pytest.raises(ShardChangedError, match="shard-001.tar was read .* cannot be opened now"):
            _stream(_records(urls, index=index))


def test_random_bytes_are_unreadable(shards, tmp_path):
    urls, _ = shards
    (tmp_path / "shard-002.tar").write_bytes(np.random.default_rng(0).bytes(5000))
    assert ShardIndex.scan(expand_urls(urls)).unreadable.tolist() == [2]


def test_config_mistakes_fail_before_reading(shards, tmp_path):
    urls, _ = shards
    tokenizer = lambda texts: torch.zeros(len(texts), 4, dtype=torch.long)  # noqa: E731
    preprocess = Preprocess(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(FileNotFoundError, match="shard-003.tar"):
        ShardPairs(
            DataConfig(kind="webdataset", path=str(tmp_path / "shard-{000..003}.tar")), tokenizer, preprocess
        )
    source = ShardPairs(DataConfig(kind="webdataset", path=urls), tokenizer, preprocess)
    with pytest.raises(ValueError, match="only 12 samples .* global batch of 16"):
        source.stream(16, seed=0, rank=0, world_size=4, start_step=0)
    batch = next(source.stream(4, seed=0, rank=3, world_size=4, start_step=0))  # 4 ranks share 3 shards
    assert len(batch["index"]) + len(batch["skipped"]) == 1


def _batches(urls, workers: int, start: int) -> list[tuple[list[str], list]]:
    index = ShardIndex.scan(expand_urls(urls))
    dataset = ShardBatches(
        expand_urls(urls), index, [1, 2, 0], index.counts, lambda i: None, 3, start, TRANSFORM, collate_pairs
    )
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    return [(batch["id"], batch["index"].tolist(), batch["skipped"]) for batch in loader]


def test_workers_build_the_same_batches_in_order_and_resume_at_any_batch(shards):
    urls, records = shards
    alone = _batches(urls, 0, 0)
    assert len(alone) == 4
    assert sorted(key for ids, _, _ in alone for key in ids) == sorted(k for k, o in records if o == "ok")
    assert sorted(tuple(skip) for _, _, skipped in alone for skip in skipped) == [
        ("empty_caption", "part/002_00"),
        ("missing_caption", "part/001_03"),
        ("missing_image", "part/000_03"),
    ]
    assert _batches(urls, 2, 0) == alone
    for start in (1, 2, 3):  # 2 workers: odd starts are not multiples of the workers' round
        assert _batches(urls, 2, start) == alone[start:]
