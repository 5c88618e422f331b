"""Every way to name a teacher or student loads exactly those weights, through the `embed` stage, or
stops with one line: never a randomly initialised model that reports success."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import constants

from clipdistill.cache import TeacherCache
from clipdistill.checkpoint import save_state_dict
from clipdistill.cli import main as cli_main
from clipdistill.config import ModelConfig, load_config
from clipdistill.data.sources import make_pair_source
from clipdistill.embed import run_embed
from clipdistill.models.factory import ModelLoadError, build_tokenizer, create_student, preprocess_for
from own_data import REVISION, hf_cache, open_clip_folder, tiny_model, tiny_model_config, write_table

REPO = "someorg/tiny-clip"


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return write_table(tmp_path_factory.mktemp("data"), per_class=4)


@pytest.fixture
def source_model():
    return tiny_model(seed=7)


@pytest.fixture
def hub(tmp_path, monkeypatch, source_model):
    """A Hugging Face cache holding REPO (both of open_clip's weight files), offline."""
    root = hf_cache(tmp_path / "hf", REPO, source_model, tiny_model_config(), "open_clip_model.safetensors")
    snapshot = root / f"models--{REPO.replace('/', '--')}" / "snapshots" / REVISION
    torch.save(source_model.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def _embed_args(run_dir, table, name, pretrained=""):
    return [
        "--run_dir", str(run_dir), "--data.kind", "csv", "--data.path", str(table),
        "--data.caption_key", "title", "--teacher.name", name, "--teacher.pretrained", pretrained,
        "--embed.device", "cpu", "--embed.batch_size", "8",
    ]  # fmt: skip


@torch.no_grad()
def _reference(model, cfg):
    """The source model's normalised (image, text) embeddings of every sample, as embed computes them."""
    config = tiny_model_config()
    source = make_pair_source(cfg.data, build_tokenizer(config), preprocess_for(config))
    (batch,) = source.batches([list(range(len(source)))])
    image = F.normalize(model.encode_image(batch["image"]), dim=-1)
    return image, F.normalize(model.encode_text(batch["text"]), dim=-1)


def _forms(tmp_path, model):
    """(teacher.name, teacher.pretrained) of each way to name the model, written to disk here."""
    config = tiny_model_config()
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(config))
    save_state_dict(model.state_dict(), tmp_path / "weights.safetensors")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "w.bin")
    exported = open_clip_folder(tmp_path / "export", model, config, "open_clip_model.safetensors")
    bin_folder = open_clip_folder(tmp_path / "oc_bin", model, config, "open_clip_pytorch_model.bin")
    return {
        "json+safetensors": (str(plain), str(tmp_path / "weights.safetensors")),
        "json+pt": (str(plain), str(tmp_path / "weights.pt")),
        "json+bin(open_clip training checkpoint)": (str(plain), str(tmp_path / "w.bin")),
        "open_clip_config.json+file": (
            str(exported / "open_clip_config.json"),
            str(exported / "open_clip_model.safetensors"),
        ),
        "local-dir(safetensors)": (f"local-dir:{exported}", ""),
        "local-dir(bin)": (f"local-dir:{bin_folder}", ""),
        "hf-hub": (f"hf-hub:{REPO}", ""),
    }


def test_every_name_of_a_teacher_embeds_with_its_weights(tmp_path, table, source_model, hub):
    for form, (name, pretrained) in _forms(tmp_path, source_model).items():
        cfg = load_config(None, _embed_args(tmp_path / form, table, name, pretrained))
        run_embed(cfg)
        cache = TeacherCache(tmp_path / form / "cache")
        assert cache.valid.all(), form
        image, text = cache.rows(list(range(len(cache))))
        want_image, want_text = _reference(source_model, cfg)
        assert torch.allclose(image, want_image, atol=2e-3), form  # float16 cache
        assert torch.allclose(text, want_text, atol=2e-3), form
        assert "init" not in cache.meta.model_id, form
    hub_meta = TeacherCache(tmp_path / "hf-hub" / "cache").meta
    assert hub_meta.model_id == f"hf-hub:{REPO}@{REVISION}"
    assert TeacherCache(tmp_path / "local-dir(bin)" / "cache").meta.model_id.startswith("local-dir:/")


def test_open_clip_name_and_tag_from_the_local_cache(tmp_path, table, source_model, hub, monkeypatch):
    """An open_clip model name + pretrained tag whose weights are in the local Hugging Face cache."""
    config = tiny_model_config()
    model_cfg = {k: v for k, v in config.items() if k != "preprocess_cfg"}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tiny-test", model_cfg)
    pre = config["preprocess_cfg"]
    tag = open_clip.pretrained._pcfg(hf_hub=f"{REPO}/", mean=tuple(pre["mean"]), std=tuple(pre["std"]))
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "tiny-test", {"mine": tag})
    cfg = load_config(None, _embed_args(tmp_path, table, "tiny-test", "mine"))
    run_embed(cfg)
    cache = TeacherCache(tmp_path / "cache")
    image, text = cache.rows(list(range(len(cache))))
    want_image, want_text = _reference(source_model, cfg)
    assert torch.allclose(image, want_image, atol=2e-3) and torch.allclose(text, want_text, atol=2e-3)
    assert cache.meta.model_id == "tiny-test@mine"


def test_students_load_the_same_ways(tmp_path, source_model, hub):
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = source_model.encode_image(images)
    for form, (name, pretrained) in _forms(tmp_path, source_model).items():
        loaded = create_student(ModelConfig(name=name, pretrained=pretrained))
        with torch.no_grad():
            assert torch.allclose(loaded.model.encode_image(images), want, atol=1e-6), form
        assert loaded.has_weights, form


def _one_line_error(tmp_path, table, name, pretrained, capsys) -> str:
    assert cli_main(["embed", *_embed_args(tmp_path / "run", table, name, pretrained)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "run" / "cache" / "meta.json").exists()  # nothing was embedded
    return err


def test_a_teacher_without_weights_is_refused(tmp_path, table, source_model, hub, capsys):
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(tiny_model_config()))
    err = _one_line_error(tmp_path, table, str(plain), "", capsys)
    assert "has no pretrained weights: pass --teacher.pretrained FILE or a name that carries weights" in err
    err = _one_line_error(tmp_path, table, "ViT-B-32", "", capsys)  # an open_clip name without its tag
    assert "has no pretrained weights" in err
    # a folder or hub entry without weights, or not there at all: never a random model
    empty = open_clip_folder(tmp_path / "no_weights", source_model, tiny_model_config(), None)
    assert "holds no weights" in _one_line_error(tmp_path, table, f"local-dir:{empty}", "", capsys)
    assert "is not a folder" in _one_line_error(tmp_path, table, f"local-dir:{tmp_path}/nope", "", capsys)
    missing = _one_line_error(tmp_path, table, "hf-hub:someorg/absent", "", capsys)
    assert "not in the local Hugging Face cache" in missing or "local Hugging Face cache" in missing
    other = tiny_model(seed=1, embed_dim=16)
    save_state_dict(other.state_dict(), tmp_path / "other.safetensors")
    err = _one_line_error(tmp_path, table, f"local-dir:{empty}", str(tmp_path / "other.safetensors"), capsys)
    assert "does not fit" in err


def test_the_lab_models_teach_without_weights_only_on_the_lab_or_when_asked(tmp_path, table, capsys):
    """The default teacher (`lab-teacher`, trained here by the lab) on your own data, without weights:
    refused; `--teacher.pretrained random` asks for a random stand-in and the cache says so."""
    assert "'lab-teacher' has no pretrained weights" in _one_line_error(
        tmp_path, table, "lab-teacher", "", capsys
    )
    cfg = load_config(None, _embed_args(tmp_path / "stand_in", table, "lab-student-tiny", "random"))
    run_embed(cfg)
    assert TeacherCache(tmp_path / "stand_in" / "cache").meta.model_id == "lab-student-tiny@random"


def test_a_local_dir_without_weights_is_refused_for_a_student_too(tmp_path, source_model):
    empty = open_clip_folder(tmp_path / "no_weights", source_model, tiny_model_config(), None)
    with pytest.raises(ModelLoadError, match="holds no weights"):
        create_student(ModelConfig(name=f"local-dir:{empty}"))
