"""The Task contract: every recipe states it, the trainer knows recipes only through it, and the
package's layers import one way."""

import ast
import typing
from pathlib import Path

import numpy as np

import clipdistill
from clipdistill.config import Method
from clipdistill.methods import METHODS, method_sections, needs_teacher_cache, task_class
from clipdistill.methods.task import CacheUse, Task

PACKAGE = Path(clipdistill.__file__).parent


def test_every_method_is_a_task_with_a_typed_cache_use():
    assert set(METHODS) == set(typing.get_args(Method))  # the config's choices are the registered recipes
    for name, cls in METHODS.items():
        assert issubclass(cls, Task) and isinstance(cls.cache_use, CacheUse), name
        assert cls.from_config is not Task.from_config, name
    # only the learned temperatures' clamps run after a step (CLIP's, the cross EduAttention's); no recipe
    # carries a do-nothing hook
    hooks = sorted(cls.__name__ for cls in set(METHODS.values()) if "after_step" in vars(cls))
    assert hooks == ["ClipTask", "ComkdTask"]
    assert task_class("cid").cache_use is CacheUse.REQUIRED and needs_teacher_cache("fd")
    assert task_class("prompt_teacher").cache_use is CacheUse.OPTIONAL
    assert task_class("clip").cache_use is CacheUse.NONE
    assert method_sections("cid") == ("cid", "cluster", "balance") and method_sections("clip") == ()


def test_the_default_pool_is_the_trainers():
    pool = np.array([0, 3, 5])
    assert Task().training_pool(pool) is pool


def test_the_trainer_knows_no_method_by_name():
    source = (PACKAGE / "train.py").read_text().lower()
    for word in [*METHODS, "comkd", "prompt", "inductive", "labelled", "text_bank", "hasattr"]:
        if word != "clip":  # clip_grad_norm_, the gradient clipping
            assert word not in source, word


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


def test_lower_layers_never_import_the_trainer_or_the_stages():
    stages = ("clipdistill.train", "clipdistill.evaluate", "clipdistill.embed", "clipdistill.curate.stages",
              "clipdistill.lab", "clipdistill.export", "clipdistill.predict", "clipdistill.cli")  # fmt: skip
    for layer in ("data", "models", "losses", "methods"):
        for path in (PACKAGE / layer).rglob("*.py"):
            bad = {m for m in _imports(path) if m.startswith(stages)}
            assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"
    assert not {m for m in _imports(PACKAGE / "train.py") if m.startswith(stages[1:])}
