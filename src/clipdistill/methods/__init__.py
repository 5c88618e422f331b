"""Training recipes: each is a `Task` (methods/task.py) registered here under its `train.method` name.

A recipe that distils reads the teacher only from the cache (`Task.cache_use`): the trainer adds the
cached `teacher_image` and `teacher_text` rows to every batch, the teacher never runs in the loop.
"""

from __future__ import annotations

from torch import nn

from clipdistill.cache import TeacherCache
from clipdistill.config import ConfigError, RunConfig
from clipdistill.methods.baselines import BASELINES, BaselineTask
from clipdistill.methods.cid import CidTask
from clipdistill.methods.clip import ClipTask
from clipdistill.methods.comkd import ComkdTask
from clipdistill.methods.prompt_teacher import PromptTeacherTask
from clipdistill.methods.task import CacheUse, Task

# train.method -> its Task (config.Method lists the same names, checked when a config loads)
METHODS: dict[str, type[Task]] = {
    "clip": ClipTask,
    "cid": CidTask,
    "prompt_teacher": PromptTeacherTask,
    "comkd": ComkdTask,
    "promptkd": ComkdTask,
    **{kind: BaselineTask for kind in BASELINES},
}


def task_class(method: str) -> type[Task]:
    if method not in METHODS:
        raise ConfigError(f"unknown train.method {method!r}; known: {sorted(METHODS)}")
    return METHODS[method]


def method_sections(method: str) -> tuple[str, ...]:
    """Config sections `method` reads besides data, models and trainer (part of its run's fingerprint)."""
    return METHODS[method].sections if method in METHODS else ()


def method_lab_data_keys(method: str) -> tuple[str, ...]:
    """Keys of the papers' data section `method` reads on the lab too (part of its run's fingerprint)."""
    return METHODS[method].lab_data_keys if method in METHODS else ()


def method_unread_keys(method: str, values: dict) -> dict[str, dict[str, object]]:
    """Section -> {key: value its fingerprint records} for the keys `method` does not read in the run
    configured by `values` (its sections as dicts; `Task.unread_keys`)."""
    return METHODS[method].unread_keys(method, values) if method in METHODS else {}


def needs_teacher_cache(method: str) -> bool:
    return task_class(method).cache_use is CacheUse.REQUIRED


def build_task(cfg: RunConfig, model: nn.Module, cache: TeacherCache | None) -> Task:
    """The recipe `cfg.train.method` around `model` (with the cache's widths where it distils)."""
    return task_class(cfg.train.method).from_config(cfg, model, cache)
