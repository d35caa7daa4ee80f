"""selfref: self-referential neural networks and meta-optimization in PyTorch.

A network built from four submodules (normal, evaluation, analyzing, modifying) that
modifies its own weights, trained by a differentiable meta-gradient loop; and the baseline
meta-optimizers (grid, random, Bayesian optimization, RMAD, hypernetworks) behind one
harness with one budget. See README.md and ../shared/DESIGN.md.

The public API is listed in ``__all__``; heavier pieces are imported on first use so that
``import selfref`` and the CLI start quickly.

Example:
    >>> import selfref
    >>> task = selfref.tasks.make("digits-mlp")
    >>> out = selfref.train(task, "adam", {"lr": 0.01}, steps=5, seed=0)
    >>> len(out.losses)
    5
"""

from __future__ import annotations

import importlib
from typing import Any

from selfref import methods, tasks
from selfref.budget import Budget, BudgetExceeded, CostCounter
from selfref.logging import Logger, MemoryLogger, MultiLogger, PrintLogger, TensorBoardLogger
from selfref.methods.base import Result
from selfref.runs import RunDir

# Bound eagerly: a lazy attribute named like the submodule would be overwritten by the
# import system the first time `selfref.train` (the module) is imported.
from selfref.train import TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "tasks",
    "methods",
    "Budget",
    "BudgetExceeded",
    "CostCounter",
    "Result",
    "RunDir",
    "Logger",
    "TensorBoardLogger",
    "PrintLogger",
    "MemoryLogger",
    "MultiLogger",
    "train",
    "TrainResult",
    "make_optimizer",
    "SelfReferentialNet",
    "LearnedOptimizer",
    "make_core",
]

# name -> module that defines it (imported lazily by __getattr__)
_LAZY = {
    "make_optimizer": "selfref.optim",
    "SelfReferentialNet": "selfref.net",
    "LearnedOptimizer": "selfref.net.optimizer",
    "make_core": "selfref.net.cores",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'selfref' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
