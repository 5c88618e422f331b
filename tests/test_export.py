"""`export`: the open_clip folder reloads exactly, the ONNX encoders match PyTorch and run without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import onnxruntime as ort
import open_clip
import pytest
import torch
import yaml

from clipdistill import export as export_module
from clipdistill.checkpoint import save_state_dict
from clipdistill.config import ConfigError, RunConfig, to_dict
from clipdistill.export import export_onnx, export_open_clip, run_export
from clipdistill.models.classifier import load_trained
from clipdistill.models.factory import create_model
from clipdistill.models.heads import ComkdHead, comkd_settings, load_head
from conftest import run_cli

TEXTS = ["a photo of a cat.", "a sandal", "an ankle boot on a white background"]


def fake_run(cfg: RunConfig, name: str, method: str = "clip") -> Path:
    """A train folder as `train` leaves it (random weights): no training needed to test shipping."""
    torch.manual_seed(0)
    cfg.train.method = method
    folder = Path(cfg.run_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    loaded = create_model(cfg.student)
    save_state_dict(loaded.model.state_dict(), folder / "model.safetensors")
    if method == "comkd":
        head = ComkdHead(loaded.embed_dim, torch.randn(5, 24), comkd_settings(cfg))
        torch.nn.init.normal_(head.edu.alpha)  # a trained gate, not its starting value
        save_state_dict({f"head.{k}": v for k, v in head.state_dict().items()}, folder / "heads.safetensors")
    return folder


@pytest.fixture
def run(tiny_config):
    cfg = tiny_config()
    fake_run(cfg, "student")
    return cfg


def test_open_clip_local_dir_reproduces_embeddings(run, tmp_path):
    loaded = load_trained(run, "student")
    folder = export_open_clip(loaded, tmp_path / "oc")
    config = json.loads((folder / "open_clip_config.json").read_text())
    assert (
        set(config) == {"model_cfg", "preprocess_cfg"} and (folder / "open_clip_model.safetensors").is_file()
    )
    # frozen like the trained model: torch's MultiheadAttention takes another (fused) path then
    model = open_clip.create_model("local-dir:" + str(folder)).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer("local-dir:" + str(folder))
    assert torch.equal(tokenizer(TEXTS), loaded.tokenizer(TEXTS))
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.encode_image(pixels), loaded.model.encode_image(pixels))
        tokens = loaded.tokenizer(TEXTS)
        assert torch.equal(model.encode_text(tokens), loaded.model.encode_text(tokens))


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_pytorch(run, tmp_path, batch):
    loaded = load_trained(run, "student")
    folder = export_onnx(loaded, tmp_path / "onnx")
    spec = json.loads((folder / "preprocess.json").read_text())
    assert spec["image_size"] == 32 and spec["tokenizer"]["context_length"] == 16
    pixels = torch.randn(batch, 3, 32, 32)
    tokens = loaded.tokenizer(TEXTS[:batch])
    with torch.no_grad():
        want_image = torch.nn.functional.normalize(loaded.model.encode_image(pixels), dim=-1).numpy()
        want_text = torch.nn.functional.normalize(loaded.model.encode_text(tokens), dim=-1).numpy()
    got_image = _session(folder / "image_encoder.onnx").run(None, {"pixels": pixels.numpy()})[0]
    got_text = _session(folder / "text_encoder.onnx").run(None, {"tokens": tokens.long().numpy()})[0]
    assert got_image.shape == want_image.shape and np.abs(got_image - want_image).max() <= 1e-4
    assert got_text.shape == want_text.shape and np.abs(got_text - want_text).max() <= 1e-4


@pytest.mark.parametrize("eduattention", ["mean_text", "cross"])
def test_comkd_head_and_bank_exported(tiny_config, eduattention):
    cfg = tiny_config("--comkd.eduattention", eduattention, "--comkd.attention_heads", "4")
    fake_run(cfg, "kd", method="comkd")
    cfg.export.model, cfg.export.format = "kd", "onnx"
    folder = Path(run_export(cfg)["onnx"])
    head = load_head(Path(cfg.run_dir) / "kd")
    bank = np.load(folder / "text_bank.npy")
    assert np.allclose(bank, head.text_bank.numpy())
    features = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    with torch.no_grad():
        want = torch.nn.functional.normalize(head(features), dim=-1).numpy()
    got = _session(folder / "head.onnx").run(None, {"embedding": features.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4
    assert json.loads((folder / "preprocess.json").read_text())["head"]["classes"] == 5


def test_comkd_student_ships_as_onnx_only(tiny_config):
    """open_clip's format would keep the image tower and drop the head: such an export classifies
    nothing right, so it is refused, and `all` writes the ONNX export alone."""
    cfg = tiny_config("--export.model", "kd")
    fake_run(cfg, "kd", method="comkd")
    cfg.export.format = "open_clip"
    with pytest.raises(ConfigError, match="kd is a ComKD student: .* --format onnx exports them"):
        run_export(cfg)
    cfg.export.format = "all"
    result = run_export(cfg)
    assert "open_clip" not in result and "cannot hold a ComKD student's head" in result["note"]
    assert not (Path(cfg.run_dir) / "kd" / "export" / "open_clip").exists()
    assert (Path(result["onnx"]) / "head.onnx").is_file()


def test_a_prompt_tuned_teacher_is_not_exported_without_its_text_bank(tiny_config):
    """Its export would zero-shot with plain prompts: other answers than the model's, silently."""
    cfg = tiny_config("--export.model", "pt")
    folder = fake_run(cfg, "pt", method="prompt_teacher")
    run_export(cfg)  # no bank yet: a plain model
    np.save(folder / "text_bank.npy", np.zeros((5, 24), np.float32))
    with pytest.raises(ConfigError, match="pt is a prompt-tuned teacher: .* export does not carry yet"):
        run_export(cfg)


NO_TORCH = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
import onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
out = session.run(None, {"pixels": np.zeros((2, 3, 32, 32), np.float32)})[0]
print(out.shape, "torch" in sys.modules and sys.modules["torch"] is not None)
"""


@pytest.mark.slow
def test_onnx_image_encoder_runs_without_torch(run, tmp_path):
    folder = export_onnx(load_trained(run, "student"), tmp_path / "onnx")
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(folder / "image_encoder.onnx")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["(2,", "32)", "False"]


@pytest.mark.slow
def test_cli_export_both_formats(run):
    done = run_cli(["export", "--run_dir", run.run_dir, "--export.model", "student"])
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (Path(result["open_clip"]) / "open_clip_model.safetensors").is_file()
    assert (Path(result["onnx"]) / "image_encoder.onnx").is_file()
    done = run_cli(["export", "--run_dir", run.run_dir, "--export.model", "student", "--format", "open_clip"])
    assert done.returncode == 0 and "onnx" not in json.loads(done.stdout), done.stderr


def test_onnx_export_without_the_onnx_package_is_refused_before_any_work(tiny_config, monkeypatch):
    monkeypatch.setattr(export_module, "find_spec", lambda name: None if name == "onnx" else find_spec(name))
    with pytest.raises(
        ConfigError,
        match=r"pip install 'clipdistill\[onnx\]' \(or, but for a ComKD student, --format open_clip\)",
    ):
        run_export(tiny_config("--export.model", "not_trained"))
