"""The Method contract and the Result every method returns.

A method spends a :class:`~selfref.budget.Budget` on a :class:`~selfref.tasks.Task` and
returns a :class:`Result`: the best metaparameters it found (or a pointer to meta-weights),
final val/test metrics of the weights it trained with them, the curve of best-so-far
validation loss against gradient evaluations, and its costs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from selfref.budget import Budget
from selfref.logging import Logger
from selfref.runs import json_safe
from selfref.tasks import Task

__all__ = ["Method", "Result", "Status", "CurvePoint"]

Status = Literal["ok", "diverged", "failed"]


@dataclass
class CurvePoint:
    """Best-so-far validation loss after ``grad_evals`` gradient evaluations."""

    grad_evals: int
    best_val_loss: float


@dataclass
class Result:
    """Outcome of one method run (``to_dict()`` is what results.json holds).

    Attributes:
        method, task, seed: what ran.
        best_hparams: best metaparameters found ({} for methods that learn meta-weights).
        meta_weights: path to learned meta-weights (checkpoint), if any.
        val_loss, test_loss, val_accuracy, test_accuracy: final metrics of the returned weights
            (accuracy None where the task has none).
        curve: best-so-far val loss against gradient evaluations, in increasing grad_evals.
        grad_evals: gradient evaluations spent from the budget.
        meta_train_grad_evals: meta-training cost, reported separately.
        wall_s, peak_mem_bytes: wall seconds and peak memory.
        status, reason: ok / diverged / failed, and why if not ok.
        extra: method-specific numbers (e.g. trials run, learned schedules summary).
    """

    method: str
    task: str
    seed: int
    best_hparams: dict[str, Any] = field(default_factory=dict)
    meta_weights: str | None = None
    val_loss: float = math.nan
    test_loss: float = math.nan
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    curve: list[CurvePoint] = field(default_factory=list)
    grad_evals: int = 0
    meta_train_grad_evals: int = 0
    wall_s: float = 0.0
    peak_mem_bytes: int = 0
    status: Status = "ok"
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["curve"] = [[p.grad_evals, p.best_val_loss] for p in self.curve]
        return json_safe(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        d = dict(d)
        d["curve"] = [CurvePoint(int(g), float(v)) for g, v in d.get("curve", [])]
        for k in ("val_loss", "test_loss"):
            if d.get(k) is None:
                d[k] = math.nan
        return cls(**d)


@runtime_checkable
class Method(Protocol):
    """A meta-optimizer: ``run(task, budget, logger=None, seed=0) -> Result``."""

    name: ClassVar[str]

    def run(
        self, task: Task, budget: Budget, logger: Logger | None = None, seed: int = 0
    ) -> Result: ...
