"""`predict` and `embed-images`: zero-shot labels and embeddings of image files, PyTorch or ONNX."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipdistill.config import ConfigError
from clipdistill.export import export_onnx
from clipdistill.models.classifier import load_trained
from clipdistill.predict import (
    OnnxBackend,
    TorchBackend,
    build_parser,
    embed_images,
    expand_images,
    load_backend,
    predict,
    read_labels,
)
from conftest import run_cli
from test_export import fake_run

LABELS = ["cat", "dog", "ankle boot"]
BANK = ["cat", "dog", "sun", "car", "tree"]  # the classes of the fake ComKD student's text bank


@pytest.fixture
def images(tmp_path) -> Path:
    """Five readable images (one grey, one in a subfolder) and two broken files."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(folder / "sub" / "grey.jpg")
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return folder


@pytest.fixture
def run(tiny_config):
    cfg = tiny_config()
    fake_run(cfg, "student")
    return cfg


def test_expand_and_labels(images, tmp_path):
    files = expand_images([str(images)])
    assert [p.name for p in files] == sorted(p.name for p in files if p.parent == images) + ["grey.jpg"]
    assert len(files) == 7 and not any(p.suffix == ".txt" for p in files)
    assert read_labels(" cat, dog ,,bird", None) == ["cat", "dog", "bird"]
    (tmp_path / "labels.txt").write_text("# classes\ncat\n\ndog\n")
    assert read_labels(None, str(tmp_path / "labels.txt")) == ["cat", "dog"]
    with pytest.raises(ValueError):
        read_labels("cat", None)


def test_torch_and_onnx_agree_and_skip_bad_files(run, images, tmp_path):
    loaded = load_trained(run, "student")
    export_onnx(loaded, tmp_path / "onnx")
    shutil.move(tmp_path / "onnx", tmp_path / "shipped")  # the folder is self-contained: it can move
    onnx = OnnxBackend(tmp_path / "shipped")
    files = expand_images([str(images)])
    by_torch = predict(TorchBackend(loaded), files, LABELS, batch_size=2)
    by_onnx = predict(onnx, files, LABELS, batch_size=3)
    assert len(by_torch["predictions"]) == 5
    skipped = {Path(s["image"]).name: s["reason"] for s in by_torch["skipped"]}
    assert skipped == {"broken.png": "unreadable", "empty.jpg": "empty_file"}
    for a, b in zip(by_torch["predictions"], by_onnx["predictions"], strict=True):
        assert a["image"] == b["image"] and a["label"] == b["label"]
        assert abs(sum(a["probs"].values()) - 1) < 1e-4
        assert max(abs(a["probs"][k] - b["probs"][k]) for k in LABELS) < 1e-3


def test_comkd_predict_uses_head_and_bank(tiny_config, images, tmp_path):
    cfg = tiny_config()
    fake_run(cfg, "kd", method="comkd")  # no stage-1 folder: the bank's class names are unknown
    backend = load_backend("kd", "onnx", None, cfg.run_dir)
    assert backend.bank is not None and backend.bank.shape == (5, 24)
    files = expand_images([str(images)])
    result = predict(backend, files, list("abcde"))
    assert len(result["predictions"]) == 5
    with pytest.raises(ConfigError, match="text bank has 5 classes but its names"):
        predict(backend, files, LABELS)
    spec_path = Path(cfg.run_dir) / "kd" / "export" / "onnx" / "preprocess.json"
    spec = json.loads(spec_path.read_text())
    assert spec["head"]["classnames"] is None
    del spec["head"]["classnames"]  # an export made before the names were stored
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="without its class names .*: export it again"):
        load_backend("kd", "onnx", None, cfg.run_dir)


def test_comkd_onnx_looks_labels_up_by_name_as_torch_does(tiny_config, images):
    """The bank's class names travel with the ONNX export: labels in another order, or a subset of
    them, score the same on both backends, and a label the bank lacks is refused the same way."""
    cfg = tiny_config()
    fake_run(cfg, "kd", method="comkd")
    stage1 = Path(cfg.run_dir) / "prompt_teacher"
    stage1.mkdir()
    (stage1 / "split.json").write_text(json.dumps({"classnames": BANK, "base": [0, 1], "novel": [2, 3, 4]}))
    files = expand_images([str(images)])
    torch_backend, onnx_backend = (load_backend("kd", b, None, cfg.run_dir) for b in ("torch", "onnx"))
    for labels in (BANK[::-1], ["sun", "dog", "cat"]):
        by_torch, by_onnx = predict(torch_backend, files, labels), predict(onnx_backend, files, labels)
        assert "note" not in by_torch and "note" not in by_onnx
        for a, b in zip(by_torch["predictions"], by_onnx["predictions"], strict=True):
            assert a["label"] == b["label"] and max(abs(a["probs"][k] - b["probs"][k]) for k in labels) < 1e-3
    forward = predict(torch_backend, files, BANK)["predictions"]
    backward = predict(onnx_backend, files, BANK[::-1])["predictions"]
    assert [r["label"] for r in forward] == [r["label"] for r in backward]  # not by position
    errors = []
    for backend in (torch_backend, onnx_backend):
        with pytest.raises(ConfigError, match="1 classes are not in the model's text bank") as e:
            predict(backend, files, ["cat", "dog", "zebra"])
        errors.append(str(e.value))
    assert errors[0] == errors[1]


def test_embed_images(run, images, tmp_path):
    backend = TorchBackend(load_trained(run, "student"))
    result = embed_images(backend, images, tmp_path / "out" / "emb", batch_size=4)
    array = np.load(tmp_path / "out" / "emb.npy")
    ids = (tmp_path / "out" / "emb.ids.txt").read_text().splitlines()
    assert array.shape == (5, 32) and array.dtype == np.float32 and result["count"] == 5
    assert np.allclose(np.linalg.norm(array, axis=1), 1, atol=1e-5)
    assert ids[-1] == "sub/grey.jpg" and len(ids) == 5


@pytest.mark.slow
def test_cli_predict_table_and_json(run, images, tmp_path):
    args = ["--model", "student", "--run-dir", run.run_dir, "--labels", ",".join(LABELS)]
    done = run_cli(
        ["predict", str(images / "img0.png"), str(images / "broken.png"), *args, "--format", "table"]
    )
    assert done.returncode == 0, done.stderr
    assert "img0.png" in done.stdout and "skipped" in done.stdout
    done = run_cli(["predict", str(images), *args, "--backend", "onnx", "--batch-size", "2"])
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert len(result["predictions"]) == 5 and len(result["skipped"]) == 2
    assert (Path(run.run_dir) / "student" / "export" / "onnx" / "image_encoder.onnx").is_file()


def test_nothing_readable_is_refused(run, images, tmp_path):
    backend = TorchBackend(load_trained(run, "student"))
    bad = [images / "broken.png", images / "empty.jpg", tmp_path / "gone.jpg"]
    with pytest.raises(ValueError, match="none of the 3 image file"):
        predict(backend, bad, LABELS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image file found"):
        predict(backend, expand_images([str(tmp_path / "empty")]), LABELS)
    with pytest.raises(ValueError, match="no image file found"):
        embed_images(backend, tmp_path / "empty", tmp_path / "out" / "emb")
    assert not (tmp_path / "out" / "emb.npy").exists()


def test_onnx_backend_on_an_open_clip_export_is_refused(tmp_path):
    (tmp_path / "open_clip").mkdir()
    (tmp_path / "open_clip" / "open_clip_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="is an open_clip export; --backend onnx runs an ONNX export"):
        load_backend(str(tmp_path / "open_clip"), "onnx", None, None)


def test_options_take_the_stages_underscore_spelling_too():
    """`--run_dir` is how every other stage spells it: predict must not refuse it."""
    args = build_parser().parse_args(
        ["predict", "a.png", "--model", "m", "--labels_file", "l.txt", "--run_dir", "r", "--batch_size", "3"]
    )
    assert (args.run_dir, args.batch_size, args.labels_file) == ("r", 3, "l.txt")
