import os

import pytest
import torch

from clipdistill.checkpoint import (
    CheckpointError,
    atomic_write,
    load_state_dict,
    read_json,
    safe_torch_load,
    save_state_dict,
    save_training_state,
    write_json,
)


class Boom(RuntimeError):
    pass


def test_atomic_write_leaves_nothing_when_the_writer_raises(tmp_path):
    target = tmp_path / "model.safetensors"

    def half_write(tmp):
        tmp.write_bytes(b"half a file")
        raise Boom

    with pytest.raises(Boom):
        atomic_write(target, half_write)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_the_old_file_when_the_writer_raises(tmp_path):
    target = tmp_path / "done.json"
    write_json(target, {"step": 1})

    def half_write(tmp):
        tmp.write_text('{"step": 2')
        raise Boom

    with pytest.raises(Boom):
        atomic_write(target, half_write)
    assert read_json(target) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["done.json"]


class Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("loader", [load_state_dict, safe_torch_load])
def test_malicious_pickle_is_refused(tmp_path, loader):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": Payload(marker)}, path)
    assert not marker.exists()

    with pytest.raises(CheckpointError, match="refused"):
        loader(path)
    assert not marker.exists()


def test_safetensors_roundtrip(tmp_path):
    shared = torch.randn(4, 3)
    state = {"a": shared, "b": shared, "c": torch.arange(5), "d": torch.randn(3, 4).T}  # shared, int, strided
    path = tmp_path / "w.safetensors"
    save_state_dict(state, path)

    loaded = load_state_dict(path)
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(loaded[key], value) and loaded[key].dtype == value.dtype


def test_torch_state_dict_nested_and_ddp_prefixed(tmp_path):
    weight = torch.randn(2, 2)
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": {"module.linear.weight": weight}, "epoch": 3}, path)
    loaded = load_state_dict(path)
    assert list(loaded) == ["linear.weight"] and torch.equal(loaded["linear.weight"], weight)


def test_truncated_and_foreign_files_are_checkpoint_errors(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"w": torch.randn(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_state_dict(path)

    bad = tmp_path / "w.safetensors"
    bad.write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_state_dict(bad)

    not_tensors = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_tensors)
    with pytest.raises(CheckpointError, match="state dict of tensors"):
        load_state_dict(not_tensors)


def test_training_state_loads_weights_only(tmp_path):
    state = {"step": 7, "rng": {"torch": torch.get_rng_state(), "python": [1, 2, 3]}, "fingerprint": "ab"}
    save_training_state(state, tmp_path / "checkpoint.pt")
    loaded = safe_torch_load(tmp_path / "checkpoint.pt")
    assert loaded["step"] == 7 and loaded["fingerprint"] == "ab"
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
