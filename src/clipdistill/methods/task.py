"""The contract between a training recipe and the trainer: the trainer knows no method by name.

A recipe is a `Task` subclass, registered by name in `clipdistill.methods.METHODS`. The trainer
builds it with `from_config`, adds the cached teacher rows to each batch when `cache_use` asks for
them, trains on `training_pool(pool)`, optimises `trainable_parameters()` against
`forward(batch)["loss"]` (with `--train.grad_share` it also measures each of the loss terms
`forward` returns under `TERM`), calls `after_step()` after each optimizer step and, once finished,
`export(folder)`.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from clipdistill.cache import TeacherCache
from clipdistill.checkpoint import save_state_dict
from clipdistill.config import RunConfig

TERM = "term/"  # forward's key prefix of a weighted loss term, still in the graph: `term/kd` is λ·L_kd


def loss_terms(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weighted loss terms of a forward's output, by name (`term/kd` -> `kd`)."""
    return {k.removeprefix(TERM): v for k, v in parts.items() if k.startswith(TERM)}


class CacheUse(Enum):
    """How a recipe uses the teacher cache (`embed`'s output): the teacher never runs in the loop."""

    NONE = "none"  # trains without it (it still keeps `embed`'s bad samples out of the pool when built)
    OPTIONAL = "optional"  # reads the batch's teacher rows when the run's cache is built
    REQUIRED = "required"  # distils from it: the run refuses to start without a matching cache


class Task(nn.Module):
    """A recipe around `model` (the open_clip model being trained, saved as model.safetensors).

    forward(batch) -> {"loss": the scalar to minimise, `TERM + name`: each weighted term of the loss
    that is on, in the graph (they sum to "loss"; the trainer measures their gradients on request and
    logs nothing else of them), other names: detached parts that are logged}.
    A batch holds "image", "text", "index" (sample row) and, when `cache_use` is not NONE and the
    cache is there, "teacher_image", "teacher_text" and "cache_row".
    """

    cache_use: ClassVar[CacheUse] = CacheUse.NONE
    sections: ClassVar[tuple[str, ...]] = ()  # config sections it reads besides data, models, train
    # adapts a pretrained teacher around its frozen weights (prompt tuning): the teacher must carry weights
    adapts_pretrained_teacher: ClassVar[bool] = False
    # keys of the papers' data section it reads on the lab too (part of its run's fingerprint there)
    lab_data_keys: ClassVar[tuple[str, ...]] = ()
    model: nn.Module

    @classmethod
    def unread_keys(cls, method: str, values: dict) -> dict[str, dict[str, object]]:
        """Section -> {key: what the run's fingerprint records for it} for the keys of its sections that
        the run configured by `values` does not read (a term that is off), so that their values cannot
        split one run in two. None leaves a key out; a value pins it (the one the runs made before the
        key's default changed recorded, so that they still match)."""
        return {}

    @classmethod
    def from_config(cls, cfg: RunConfig, model: nn.Module, cache: TeacherCache | None) -> Task:
        """The task of `cfg` around `model` (with the cache's widths where it distils)."""
        raise NotImplementedError

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of what the optimizer updates: every parameter that requires a gradient."""
        return [(name, p) for name, p in self.named_parameters() if p.requires_grad]

    def training_pool(self, pool: np.ndarray) -> np.ndarray:
        """The sample rows this recipe trains on, out of the run's pool (valid, within train.subset)."""
        return pool

    def after_step(self) -> None:
        """Called after each optimizer step (CLIP keeps its temperature in range here)."""

    def heads(self) -> dict[str, nn.Module]:
        """Modules besides the model that inference needs, saved in heads.safetensors."""
        return {}

    def export(self, out: Path) -> None:
        """Write the trained outputs into `out`: model.safetensors, heads.safetensors when there are
        heads; a recipe that writes more (stage 1's text bank) adds it after these."""
        save_state_dict(self.model.state_dict(), out / "model.safetensors")
        heads = self.heads()
        if heads:
            save_state_dict(
                {f"{n}.{k}": v for n, h in heads.items() for k, v in h.state_dict().items()},
                out / "heads.safetensors",
            )
