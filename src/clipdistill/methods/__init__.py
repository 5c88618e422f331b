"""Training recipes: each builds a task module whose forward(batch) returns {"loss": ..., parts}.

A recipe that distils declares it needs the teacher cache; the trainer then adds the cached
`teacher_image` and `teacher_text` rows to every batch (the teacher never runs in the loop).
A recipe that can use the cache but also works without it (stage 1 of ComKD) gets the rows
when the run's cache is built.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from clipdistill.cache import TeacherCache
from clipdistill.config import ConfigError, RunConfig
from clipdistill.methods.baselines import BASELINES, baseline_builder
from clipdistill.methods.cid import build_cid
from clipdistill.methods.clip import ClipTask
from clipdistill.methods.comkd import build_comkd
from clipdistill.methods.prompt_teacher import build_prompt_teacher

Builder = Callable[[RunConfig, nn.Module, TeacherCache | None], nn.Module]

# name -> (builder, its use of the teacher cache: "required" | "optional" | "none")
METHODS: dict[str, tuple[Builder, str]] = {
    "clip": (lambda cfg, model, cache: ClipTask(model), "none"),
    "cid": (build_cid, "required"),
    "prompt_teacher": (build_prompt_teacher, "optional"),
    "comkd": (build_comkd, "required"),
    "promptkd": (build_comkd, "required"),
    **{kind: (baseline_builder(kind), "required") for kind in BASELINES},
}


# Config sections each method reads besides data, models and trainer (part of its run's fingerprint).
SECTIONS = {
    "cid": ("cid", "cluster", "balance"),
    "prompt_teacher": ("comkd",),
    "comkd": ("comkd",),
    "promptkd": ("comkd",),
    **{kind: ("distill",) for kind in BASELINES},
}


def method_sections(method: str) -> tuple[str, ...]:
    return SECTIONS.get(method, ())


def needs_teacher_cache(method: str) -> bool:
    return _lookup(method)[1] == "required"


def reads_teacher_cache(method: str) -> bool:
    """Whether the method uses the cache's rows when there is one (required or optional)."""
    return _lookup(method)[1] != "none"


def build_task(cfg: RunConfig, model: nn.Module, cache: TeacherCache | None) -> nn.Module:
    """The recipe `cfg.train.method` around `model` (with the cache's widths where it distils)."""
    return _lookup(cfg.train.method)[0](cfg, model, cache)


def _lookup(method: str) -> tuple[Builder, str]:
    if method not in METHODS:
        raise ConfigError(f"unknown train.method {method!r}; known: {sorted(METHODS)}")
    return METHODS[method]
