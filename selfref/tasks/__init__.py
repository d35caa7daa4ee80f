"""What is learned: the Task protocol and the registry of task families.

One file per family: ``quadratic.py`` (L2L random quadratics), ``digits.py`` (digits-mlp,
digits-logreg), ``mnist.py`` (mnist-mlp from IDX files), ``fewshot.py`` (in-context
few-shot digits sequences). ``make(name, **options)`` builds one; ``available()`` lists
names with one-line descriptions.
"""

from __future__ import annotations

import importlib
from typing import Any

from selfref.tasks.base import SPLITS, Batch, SupervisedTask, Task, check_split, resolve_device

__all__ = [
    "Task",
    "SupervisedTask",
    "Batch",
    "SPLITS",
    "check_split",
    "resolve_device",
    "make",
    "available",
    "names",
]

# name -> "module:Class"; modules are imported on first use, so `selfref tasks` stays fast.
_REGISTRY: dict[str, str] = {
    "quadratic": "selfref.tasks.quadratic:QuadraticTask",
    "digits-mlp": "selfref.tasks.digits:DigitsMLP",
    "digits-logreg": "selfref.tasks.digits:DigitsLogReg",
    "mnist-mlp": "selfref.tasks.mnist:MnistMLP",
    "fewshot-digits": "selfref.tasks.fewshot:FewShotDigits",
}


def _load(name: str) -> Any:
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def names() -> list[str]:
    """Registered task names whose module is present."""
    out = []
    for n in _REGISTRY:
        try:
            _load(n)
        except (ImportError, AttributeError):
            continue
        out.append(n)
    return out


def available() -> dict[str, str]:
    """{name: one-line description} for every task that can be built."""
    return {n: _load(n).description for n in names()}


def make(name: str, **options: Any) -> Task:
    """Build a task by registry name.

    Raises:
        ValueError: unknown name (the message lists the known ones) or a bad option.
    """
    if name not in _REGISTRY or name not in names():
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(names())}")
    cls = _load(name)
    try:
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"bad option for task {name!r}: {e}") from e
