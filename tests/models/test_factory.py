import json
import logging

import open_clip
import pytest
import torch
from open_clip.hf_model import HFTextEncoder

from clipdistill.checkpoint import save_state_dict
from clipdistill.config import ModelConfig
from clipdistill.models.factory import (
    CONFIG_DIR,
    ModelLoadError,
    create_model,
    create_teacher,
    load_model_config,
)
from clipdistill.models.locked_text import LockedHFTextEncoder

CAPTIONS = ["a photo of a bag.", "a sneaker.", "a photo of a bag.", "a pixelated coat."]


def _tiny(**kwargs):
    torch.manual_seed(0)
    return create_model(ModelConfig(name="lab-student-tiny", **kwargs))


def _outputs(loaded):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return loaded.model.encode_image(images), loaded.model.encode_text(loaded.tokenizer(CAPTIONS))


def _assert_same_outputs(a, b):
    for x, y in zip(_outputs(a), _outputs(b), strict=True):
        assert torch.equal(x, y)


def test_shipped_config():
    loaded = _tiny()
    assert isinstance(loaded.model, open_clip.model.CLIP)
    assert loaded.embed_dim == 32
    assert loaded.preprocess.image_size == 32 and loaded.preprocess.mean == (0.286, 0.286, 0.286)
    assert loaded.tokenizer(["a bag"]).shape == (1, 16)
    assert loaded.model_id == "lab-student-tiny@init"
    image, text = _outputs(loaded)
    assert image.shape == (2, 32) and text.shape == (4, 32)


def test_json_config_path(tmp_path):
    config = json.loads((CONFIG_DIR / "lab-student-tiny.json").read_text())
    config["embed_dim"] = 24
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(config))
    loaded = create_model(ModelConfig(name=str(path)))
    assert loaded.embed_dim == 24
    assert _outputs(loaded)[0].shape == (2, 24)


def test_local_safetensors_checkpoint(tmp_path):
    trained = _tiny()
    with torch.no_grad():
        trained.model.logit_scale.fill_(1.5)
        trained.model.visual.proj.mul_(-2)
    save_state_dict(trained.model.state_dict(), tmp_path / "model.safetensors")

    loaded = create_model(
        ModelConfig(name="lab-student-tiny", pretrained=str(tmp_path / "model.safetensors"))
    )
    _assert_same_outputs(loaded, trained)
    assert loaded.model.logit_scale.item() == 1.5
    assert loaded.weights_hash() == trained.weights_hash() != _tiny().weights_hash()
    assert loaded.model_id == "lab-student-tiny@model.safetensors"


@pytest.mark.parametrize("nested", [False, True])
def test_torch_state_dict_checkpoint(tmp_path, nested):
    trained = _tiny()
    with torch.no_grad():
        trained.model.visual.proj.mul_(-2)
    state = trained.model.state_dict()
    torch.save({"state_dict": state, "epoch": 1} if nested else state, tmp_path / "ckpt.pt")

    loaded = create_model(ModelConfig(name="lab-student-tiny", pretrained=str(tmp_path / "ckpt.pt")))
    _assert_same_outputs(loaded, trained)


def test_checkpoint_that_does_not_fit(tmp_path):
    state = _tiny().model.state_dict()
    state["visual.proj"] = torch.zeros(3)  # another model's shape: a clear error, not a torch dump
    state["extra"] = torch.zeros(1)
    del state["logit_scale"]
    save_state_dict(state, tmp_path / "other.safetensors")
    with pytest.raises(ModelLoadError) as info:
        create_model(ModelConfig(name="lab-student-tiny", pretrained=str(tmp_path / "other.safetensors")))
    assert "does not fit model lab-student-tiny" in str(info.value)
    assert "missing ['logit_scale']" in str(info.value) and "unexpected ['extra']" in str(info.value)
    assert "other shape ['visual.proj']" in str(info.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        create_model(ModelConfig(name="lab-student-tiny", pretrained=str(tmp_path / "gone.safetensors")))


def test_pretrained_tag_without_network(monkeypatch, caplog):
    calls = []

    def offline(name, pretrained=None, **kwargs):
        calls.append((name, pretrained))
        logging.error(f"Failed to download weights for tag '{pretrained}'")  # as open_clip does, then raises
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(ModelLoadError) as info:
        create_model(ModelConfig(name="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    message = str(info.value)
    assert calls == [("ViT-B-32", "laion2b_s34b_b79k")]
    assert "network" in message and "--teacher.pretrained" in message and "laion2b_s34b_b79k" in message
    assert not caplog.records  # the error reaches the user once, in the exception's one line
    assert logging.getLogger().isEnabledFor(logging.ERROR)  # and logging is back on


def test_unknown_pretrained_tag_lists_the_known_tags(monkeypatch):
    monkeypatch.setattr(open_clip, "create_model", lambda *a, **k: pytest.fail("nothing to download"))
    with pytest.raises(ModelLoadError) as info:
        create_model(ModelConfig(name="ViT-B-32", pretrained="laion2b_typo"))
    message = str(info.value)
    assert "'laion2b_typo' is not a pretrained tag of open_clip 'ViT-B-32'" in message
    assert "'laion2b_s34b_b79k'" in message and "network" not in message


def test_unknown_model_lists_shipped_configs():
    with pytest.raises(ModelLoadError) as info:
        create_model(ModelConfig(name="lab-studnet"))
    for name in ("lab-student", "lab-student-tiny", "lab-teacher"):
        assert f"'{name}'" in str(info.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model_config("/nowhere/model.json")
    with pytest.raises(ModelLoadError, match="no model name"):
        create_model(ModelConfig(name=""))


def test_teacher_is_frozen_and_in_eval_mode():
    teacher = create_teacher(ModelConfig(name="lab-student-tiny"), lab_data=True)  # a lab stand-in
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    trainable = create_teacher(ModelConfig(name="lab-student-tiny"), trainable=True)
    assert all(p.requires_grad for p in trainable.model.parameters())


def test_lock_text_on_a_builtin_text_tower():
    model = _tiny(lock_text=True).model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "text_projection" in trainable and "logit_scale" in trainable
    assert "token_embedding.weight" not in trainable and "ln_final.weight" not in trainable
    assert {n for n, _ in model.visual.named_parameters()} == {
        n.removeprefix("visual.") for n in trainable if n.startswith("visual.")
    }


def test_locked_hf_text_tower():
    loaded = create_model(ModelConfig(name="lab-teacher", lock_text=True))
    text = loaded.model.text
    assert isinstance(text, LockedHFTextEncoder)
    assert not any(p.requires_grad for p in text.transformer.parameters())
    assert all(p.requires_grad for p in text.proj.parameters())
    assert all(p.requires_grad for p in loaded.model.visual.parameters())

    loaded.model.train()
    assert text.training and not text.transformer.training
    assert not any(m.training for m in text.transformer.modules())

    tokens = loaded.tokenizer(CAPTIONS)
    with torch.no_grad():
        plain = HFTextEncoder.forward(text, tokens)
        first = text(tokens)
        assert len(text.memo) == 3  # one entry per distinct caption
        second = text(tokens[[3, 0]])  # now from the memo
    torch.testing.assert_close(first, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(second, first[[3, 0]], rtol=0, atol=1e-6)

    text(tokens).sum().backward()  # the projection trains through memoised features
    assert text.proj.weight.grad is not None and text.proj.weight.grad.abs().sum() > 0
    assert set(text.state_dict()) == set(HFTextEncoder.state_dict(text))
