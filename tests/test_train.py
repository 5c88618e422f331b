import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clipdistill import train as train_module
from clipdistill.checkpoint import read_json, safe_torch_load
from clipdistill.config import ConfigError
from clipdistill.methods.clip import ClipTask
from clipdistill.runs import output_dir
from clipdistill.train import TrainingDiverged, train
from conftest import pairs_overrides, run_cli

# `clipdistill train` with every step slowed down, so that a kill lands mid-way
SLOW_TRAIN = (
    "import sys, time, clipdistill.train as t; f = t.prepare_batch; "
    "t.prepare_batch = lambda *a: (time.sleep(0.1), f(*a))[1]; "
    "from clipdistill.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)  # train(--train.deterministic true) sets it process-wide


def _metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_kill_9_then_resume_auto_matches_an_uninterrupted_run(tmp_path, pairs_config, synthetic_pairs):
    extra = ("--train.deterministic", "true", "--train.steps", "12", "--train.ckpt_every", "2")
    args = ["train", *pairs_overrides(tmp_path / "killed", synthetic_pairs, *extra)]
    out = tmp_path / "killed" / "clip"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_TRAIN, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 60
        while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "train finished before it could be killed"
    assert not (out / "done.json").exists()
    assert 2 <= safe_torch_load(out / "checkpoint.pt")["step"] < 12

    rerun = run_cli(args, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert read_json(out / "done.json")["steps"] == 12

    reference = pairs_config(*extra, run_dir=tmp_path / "uninterrupted")
    train(reference)
    ref_out = output_dir(reference)
    resumed, uninterrupted = load_file(out / "model.safetensors"), load_file(ref_out / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
    # every step logged once, with the uninterrupted run's numbers
    assert [r["step"] for r in _metrics(out)] == list(range(1, 13))
    assert [r["loss"] for r in _metrics(out)] == [r["loss"] for r in _metrics(ref_out)]


class Interrupted(Exception):
    pass


def test_resume_with_another_config_is_refused_before_any_work(pairs_config, monkeypatch):
    save, load_model = train_module.save_training_state, train_module.load_model_for

    def save_then_crash(state, path):
        save(state, path)
        raise Interrupted

    monkeypatch.setattr(train_module, "save_training_state", save_then_crash)
    with pytest.raises(Interrupted):
        train(pairs_config())  # stops right after the step-2 checkpoint
    monkeypatch.setattr(train_module, "save_training_state", save)

    def no_work(cfg, task_cls):
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr(train_module, "load_model_for", no_work)
    with pytest.raises(ConfigError) as info:
        train(pairs_config("--train.lr", "1e-3"))
    assert "was written with another config (train.lr 0.002 -> 0.001)" in str(info.value)
    assert "--train.resume never" in str(info.value)

    # logging and checkpoint settings may change: the run resumes at step 2
    monkeypatch.setattr(train_module, "load_model_for", load_model)
    assert train(pairs_config("--train.log_every", "3", "--train.ckpt_every", "5"))["steps"] == 4
    assert [r["step"] for r in _metrics(output_dir(pairs_config()))] == [1, 2, 3, 4]


def test_nan_loss_is_training_diverged(pairs_config, monkeypatch):
    forward, calls = ClipTask.forward, []

    def nan_at_third_step(self, batch):
        parts = forward(self, batch)
        calls.append(1)
        if len(calls) == 3:
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(ClipTask, "forward", nan_at_third_step)
    cfg = pairs_config()
    with pytest.raises(TrainingDiverged, match="loss is nan at step 3: lower --train.lr") as info:
        train(cfg)
    assert str(output_dir(cfg) / "checkpoint.pt") in str(info.value)
    assert not (output_dir(cfg) / "done.json").exists()


def test_gradient_accumulation(pairs_config, monkeypatch):
    forward, sizes = ClipTask.forward, []

    def counting(self, batch):
        sizes.append(len(batch["index"]))
        return forward(self, batch)

    monkeypatch.setattr(ClipTask, "forward", counting)
    cfg = pairs_config("--train.accum_steps", "2")
    train(cfg)
    assert sizes == [16] * 8  # 4 steps of 2 micro-batches of 32 / 2
    records = _metrics(output_dir(cfg))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)

    with pytest.raises(ConfigError, match="must divide by accum_steps"):
        train(pairs_config("--train.accum_steps", "3", "--train.name", "odd"))


def test_outputs_and_metrics(pairs_config):
    cfg = pairs_config("--train.lr", "1e-3")
    result = train(cfg)
    out = output_dir(cfg)

    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all({"step", "loss", "lr", "clip", "elapsed"} <= r.keys() for r in records)
    assert all(math.isfinite(r["loss"]) for r in records)
    # the rate each step used: warmup over 2 steps, then cosine to 0 at step 4
    assert [r["lr"] for r in records] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])
    assert records[-1]["loss"] < records[0]["loss"]

    assert result["steps"] == 4 and result["world_size"] == 1 and result["train_samples"] == 256
    assert read_json(out / "done.json") == result
    assert safe_torch_load(out / "checkpoint.pt")["step"] == 4
    assert "logit_scale" in load_file(out / "model.safetensors")


def test_done_json_makes_a_rerun_return_at_once(pairs_config, monkeypatch):
    first = train(pairs_config())

    def no_work(cfg, task_cls):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train_module, "load_model_for", no_work)
    assert train(pairs_config()) == first
    # settings that do not change the trained model do not matter
    assert (
        train(pairs_config("--train.log_every", "2", "--eval.batch_size", "7", "--lab.rows", "[a, b]"))
        == first
    )
    with pytest.raises(ConfigError, match=r"already holds a finished run with another config \(train.lr "):
        train(pairs_config("--train.lr", "1e-3"))  # the message names what differs


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (("--train.resume", "yes"), "train.resume: 'yes' is not one of 'auto', 'never'"),
        (("--train.role", "critic"), "train.role: 'critic' is not one of 'student', 'teacher'"),
        (("--train.method", "magic"), "train.method: 'magic' is not one of 'clip', 'cid'"),
    ],
)
def test_bad_train_settings_are_refused_when_the_config_loads(pairs_config, override, message):
    with pytest.raises(ConfigError, match=message):
        pairs_config(*override)


def test_a_warmup_longer_than_the_run_is_said_and_a_negative_one_refused(pairs_config, capsys):
    """With the default 50 steps of warm-up a short run never reaches train.lr: a note says so."""
    cfg = pairs_config("--train.steps", "4", "--train.warmup_steps", "-1")
    with pytest.raises(ConfigError, match="train.warmup_steps -1: steps of warm-up, 0 or more"):
        train(cfg)
    assert not output_dir(cfg).exists()
    assert train(pairs_config("--train.steps", "4", "--train.warmup_steps", "16"))["steps"] == 4
    note = "note: train.warmup_steps 16 > train.steps 4: the learning rate reaches 25% of train.lr"
    assert note in capsys.readouterr().err


def test_checkpoints_carry_the_cuda_generator_when_there_is_one(monkeypatch):
    saved, restored = torch.tensor([7, 8, 9], dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: saved)
    monkeypatch.setattr(torch.cuda, "set_rng_state", restored.append)
    state = train_module._rng_state()
    assert torch.equal(state["cuda"], saved)
    train_module._set_rng_state(state)
    assert restored == [saved]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "cuda" not in train_module._rng_state()
    train_module._set_rng_state(state)  # a GPU checkpoint resumed on a CPU: its CUDA state is not needed
    assert restored == [saved]


def test_config_yaml_is_written_atomically(pairs_config, monkeypatch):
    written, atomic_write = [], train_module.atomic_write

    def recorded(path, write):
        written.append(path)
        atomic_write(path, write)

    monkeypatch.setattr(train_module, "atomic_write", recorded)
    cfg = pairs_config()
    train(cfg)
    assert output_dir(cfg) / "config.yaml" in written
    assert yaml.safe_load((output_dir(cfg) / "config.yaml").read_text())["train"]["steps"] == cfg.train.steps


def test_augment_crops_every_step_afresh_and_off_is_the_plain_run(pairs_config, monkeypatch):
    plain = pairs_config()
    assert train_module.training_fingerprint(plain) == train_module.training_fingerprint(
        pairs_config("--train.augment", "0")
    )  # the key's default leaves every earlier run's fingerprint as it was
    seen = []
    forward = ClipTask.forward

    def recording(self, batch):
        seen.append(batch["image"].clone())
        return forward(self, batch)

    monkeypatch.setattr(ClipTask, "forward", recording)
    train(plain)
    train(pairs_config("--train.augment", "0.5", "--train.name", "augmented"))
    plain_images, augmented_images = seen[:4], seen[4:]
    assert len(augmented_images) == 4
    pairs = zip(augmented_images, plain_images, strict=True)
    assert all(a.shape == p.shape and not torch.equal(a, p) for a, p in pairs)

    with pytest.raises(ConfigError, match="crops a run without a teacher cache"):
        train(pairs_config("--train.augment", "0.5", "--train.method", "fd", "--train.name", "fd"))
    with pytest.raises(ConfigError, match="train.augment is a fraction: at most 1, not 1.5"):
        train(pairs_config("--train.augment", "1.5", "--train.name", "big"))
