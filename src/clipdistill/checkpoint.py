"""Atomic writes and safe loads: a crash never leaves a half-written file under a final name,
and no checkpoint is ever unpickled (safetensors, or `torch.load(weights_only=True)`)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded safely or does not fit."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """An .npy file written atomically (no pickled objects)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
            np.save(f, array, allow_pickle=False)

    atomic_write(path, write)


def write_json(path: str | os.PathLike, value: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n"))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Model weights as safetensors (shared tensors are cloned so the file is self-contained)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def safe_torch_load(path: str | os.PathLike) -> Any:
    """`torch.load` that refuses anything but tensors and plain containers."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds Python objects other than tensors and was refused (weights_only=True): "
            "load only checkpoints you trust, converted to safetensors"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({e}); it may be truncated") from e


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights from safetensors or a torch file (raw state dict, or under 'state_dict' / 'model')."""
    path = str(path)
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except Exception as e:
            raise CheckpointError(f"{path} is not a valid safetensors file ({e})") from e
    state = safe_torch_load(path)
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def save_training_state(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Optimizer/scheduler/RNG/step state: only tensors and plain values, so it loads weights-only."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))
