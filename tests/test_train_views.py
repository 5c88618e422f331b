"""Training on a reinforced cache: each step gives every sample one view, drawn from (seed, step, row);
the student sees exactly the crop its target was computed on, and a resumed run is the same run."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from clipdistill import train as train_module
from clipdistill.cache import TeacherCache
from clipdistill.config import ConfigError, ModelConfig
from clipdistill.data.sources import make_pair_source
from clipdistill.data.views import apply_views, pick_views
from clipdistill.embed import run_embed
from clipdistill.methods.comkd import ComkdTask
from clipdistill.models.factory import create_model, create_student, create_teacher
from clipdistill.runs import cache_dir, model_dir, output_dir
from clipdistill.train import prepare_batch, train

VIEWS = ("--embed.views", "3", "--embed.view_min_scale", "0.4")
FD = ("--train.method", "fd", "--train.deterministic", "true", *VIEWS)


class Interrupted(Exception):
    pass


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture
def teacher(tmp_path):
    """A fixed stand-in teacher (`random` would draw another one in every process and config)."""
    torch.manual_seed(0)
    weights = tmp_path / "teacher.safetensors"
    save_file(create_model(ModelConfig(name="lab-student-tiny")).model.state_dict(), weights)
    return ("--teacher.pretrained", str(weights))


@pytest.fixture
def views_cache(pairs_config, teacher):
    cfg = pairs_config(*FD, *teacher)
    run_embed(cfg)
    return cfg


def _stored(cfg, kind: str) -> np.ndarray:
    """Every shard's `kind` file (emb, views, aug), read straight from disk and concatenated."""
    return np.concatenate([np.load(p) for p in sorted(cache_dir(cfg).glob(f"{kind}_*.npy"))])


def test_the_student_sees_the_view_its_target_was_computed_on(views_cache):
    cfg = views_cache
    cache = TeacherCache(cache_dir(cfg))
    rows = np.arange(0, 256, 5)
    teacher, student = create_teacher(cfg.teacher), create_student(cfg.student)
    assert torch.equal(
        teacher.model.visual.conv1.weight, load_file(cfg.teacher.pretrained)["visual.conv1.weight"]
    )
    (teacher_batch,) = make_pair_source(cfg.data, teacher.tokenizer, teacher.preprocess).batches([rows])
    (student_batch,) = make_pair_source(cfg.data, student.tokenizer, student.preprocess).batches([rows])
    batch = prepare_batch(student_batch, torch.device("cpu"), cache, 7, cfg.train.seed)

    view = pick_views(cfg.train.seed, 7, rows, 3)
    assert len(set(view.tolist())) == 3
    params = torch.from_numpy(_stored(cfg, "aug")[rows, view])
    teacher_input = apply_views(teacher_batch["image"], params)  # what `embed` encoded for that view
    assert torch.equal(batch["image"], teacher_input)
    assert not torch.equal(batch["image"], student_batch["image"])
    stored = _stored(cfg, "emb")[rows, :32].astype(np.float32)
    extra = _stored(cfg, "views")
    for i, (row, v) in enumerate(zip(rows, view, strict=True)):
        expected = stored[i] if v == 0 else extra[row, v - 1].astype(np.float32)
        assert torch.equal(batch["teacher_image"][i], torch.from_numpy(expected))
    with torch.no_grad():
        encoded = torch.nn.functional.normalize(teacher.model.encode_image(teacher_input), dim=-1)
    torch.testing.assert_close(batch["teacher_image"], encoded, atol=2e-3, rtol=0)
    other_step = prepare_batch(student_batch, torch.device("cpu"), cache, 8, cfg.train.seed)
    assert not torch.equal(other_step["image"], batch["image"])  # a new draw every step


def test_a_resumed_views_run_equals_an_uninterrupted_one(
    views_cache, pairs_config, teacher, monkeypatch, tmp_path
):
    uninterrupted = pairs_config(*FD, *teacher, "--train.name", "whole")
    train(uninterrupted)
    save = train_module.save_training_state

    def save_then_crash(state, path):
        save(state, path)
        raise Interrupted

    cfg = pairs_config(*FD, *teacher, "--train.name", "resumed")
    monkeypatch.setattr(train_module, "save_training_state", save_then_crash)
    with pytest.raises(Interrupted):
        train(cfg)  # stops right after the step-2 checkpoint
    monkeypatch.setattr(train_module, "save_training_state", save)
    assert train(cfg)["steps"] == 4
    whole, resumed = (load_file(output_dir(c) / "model.safetensors") for c in (uninterrupted, cfg))
    for key, value in whole.items():
        assert torch.equal(resumed[key], value), key
    # the views changed the run: the same seed on the plain cache trains other weights
    plain = pairs_config(*FD[:4], *teacher, "--train.name", "whole", run_dir=tmp_path / "plain")
    run_embed(plain)
    train(plain)
    other = load_file(output_dir(plain) / "model.safetensors")
    assert any(not torch.equal(other[key], value) for key, value in whole.items())


def test_comkd_distils_each_view_but_refuses_a_prompted_teachers_plain_features(
    views_cache, pairs_config, teacher, monkeypatch
):
    """ComKD's targets are the batch's cached rows, the views' own; stage 1 with visual prompts replaces
    them by its features of the plain images (image_features.npy), which no crop matches."""
    cfg = pairs_config(*VIEWS, *teacher, "--train.method", "comkd", "--train.steps", "1")
    stage1 = model_dir(cfg, "prompt_teacher")
    stage1.mkdir()
    np.save(stage1 / "text_bank.npy", torch.nn.functional.normalize(torch.randn(5, 32), dim=-1).numpy())
    seen = []
    forward = ComkdTask.forward
    monkeypatch.setattr(ComkdTask, "forward", lambda task, batch: seen.append(batch) or forward(task, batch))
    train(cfg)
    rows = seen[0]["cache_row"].numpy()
    view = pick_views(cfg.train.seed, 0, rows, 3)
    assert (view > 0).any()
    target, _, _ = TeacherCache(cache_dir(cfg)).view_rows(rows, view)
    assert torch.equal(seen[0]["teacher_image"], target)

    cache = TeacherCache(cache_dir(cfg))
    np.save(stage1 / "image_features.npy", cache.rows(np.arange(len(cache)))[0].numpy())
    cfg.train.name = "prompted"
    with pytest.raises(
        ConfigError, match="features of the plain images .*image_features.npy.* embed.views 3 crops"
    ):
        train(cfg)
    assert not (output_dir(cfg) / "metrics.jsonl").exists()
