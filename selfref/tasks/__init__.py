"""What is learned: the Task protocol and the registry of task families.

One file per family: ``quadratic.py`` (L2L random quadratics), ``digits.py`` (digits-mlp,
digits-logreg), ``mnist.py`` (mnist-mlp from IDX files), ``fewshot.py`` (in-context
few-shot digits sequences). ``make(name, **options)`` builds one; ``available()`` lists
names with one-line descriptions; ``task_class(name)`` gives the class (its options and
class-level capabilities, e.g. ``search_defaults``) without building a task.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from selfref.options import check_options
from selfref.tasks.base import (
    SPLIT_SALT,
    SPLITS,
    Batch,
    SupervisedTask,
    Task,
    check_split,
    mix_seed,
    resolve_device,
)

__all__ = [
    "Task",
    "SupervisedTask",
    "Batch",
    "SPLITS",
    "SPLIT_SALT",
    "REGISTRY",
    "check_split",
    "mix_seed",
    "resolve_device",
    "make",
    "available",
    "names",
    "task_class",
]

# name -> "module:Class"; modules are imported on first use, so `selfref tasks` stays fast.
# Read-only: a new task family is one more entry here.
REGISTRY: Mapping[str, str] = MappingProxyType(
    {
        "quadratic": "selfref.tasks.quadratic:QuadraticTask",
        "digits-mlp": "selfref.tasks.digits:DigitsMLP",
        "digits-logreg": "selfref.tasks.digits:DigitsLogReg",
        "mnist-mlp": "selfref.tasks.mnist:MnistMLP",
        "fewshot-digits": "selfref.tasks.fewshot:FewShotDigits",
    }
)


def _import(name: str) -> Any:
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def names() -> list[str]:
    """Registered task names whose module is present."""
    out = []
    for n in REGISTRY:
        try:
            _import(n)
        except (ImportError, AttributeError):
            continue
        out.append(n)
    return out


def task_class(name: str) -> Any:
    """The class registered as ``name`` (not built: nothing is loaded or drawn).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in REGISTRY or name not in names():
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(names())}")
    return _import(name)


def available() -> dict[str, str]:
    """{name: one-line description} for every task that can be built."""
    return {n: _import(n).description for n in names()}


def make(name: str, **options: Any) -> Task:
    """Build a task by registry name.

    Raises:
        ValueError: unknown name (the message lists the known ones), an unknown option (the
            message lists the valid ones), a value of the wrong type or a bad value.
    """
    cls = task_class(name)
    check_options(f"task {name!r}", cls, options)
    try:
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"bad option for task {name!r}: {e}") from e
