"""The Method contract, the Result every method returns, and the tracker they share.

A method spends a :class:`~selfref.budget.Budget` on a :class:`~selfref.tasks.Task` and
returns a :class:`Result`: the best metaparameters it found (or a pointer to meta-weights),
final val/test metrics of the weights it trained with them, the curve of best-so-far
validation loss against gradient evaluations, and its costs.

:class:`Tracker` is the scaffolding every method shares, written once: it keeps the
best-so-far curve (and logs it under ``best/val_loss_vs_grad_evals`` at step = gradient
evaluations), evaluates the final weights on val and test, and assembles the
:class:`Result` with the costs of a :class:`~selfref.budget.CostCounter`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from selfref.budget import Budget, CostCounter, peak_memory_bytes
from selfref.logging import Logger
from selfref.runs import json_safe
from selfref.tasks import Task

__all__ = ["Method", "Result", "Status", "CurvePoint", "Tracker", "FinalMetrics", "CURVE_TAG"]

CURVE_TAG = "best/val_loss_vs_grad_evals"

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


@dataclass(frozen=True)
class FinalMetrics:
    """Final val/test loss and accuracy of the weights a method returns."""

    val_loss: float = math.nan  # NaN: not evaluated (the run did not finish ok)
    test_loss: float = math.nan
    val_accuracy: float | None = None  # None where the task has no accuracy
    test_accuracy: float | None = None


class Tracker:
    """Best-so-far curve, final val/test evaluation and Result assembly for one method run.

    Args:
        method, task, seed: what runs (``task`` is evaluated by :meth:`evaluate`).
        logger: receives ``best/val_loss_vs_grad_evals`` at step = gradient evaluations for
            every curve point (None: not logged).

    Example:
        >>> from selfref.tasks import make
        >>> tr = Tracker("demo", make("quadratic"), seed=0)
        >>> tr.observe(10, 3.0), tr.observe(20, 4.0), tr.observe(30, float("nan"))
        (True, False, False)
        >>> [(p.grad_evals, p.best_val_loss) for p in tr.curve]
        [(10, 3.0), (20, 3.0), (30, 3.0)]
    """

    def __init__(self, method: str, task: Task, seed: int, logger: Logger | None = None) -> None:
        self.method = method
        self.task = task
        self.seed = seed
        self.logger = logger
        self.best = math.inf  # best finite validation loss so far
        self.curve: list[CurvePoint] = []

    def observe(self, grad_evals: int, val_loss: float | None = None) -> bool:
        """A validation loss seen after ``grad_evals`` gradient evaluations (None: no new one).

        Appends (and logs) the point (grad_evals, best so far) once some loss was finite; a
        non-finite loss never improves the best. Returns whether the best improved.
        """
        improved = val_loss is not None and math.isfinite(val_loss) and val_loss < self.best
        if improved:
            self.best = float(val_loss)  # type: ignore[arg-type]
        if math.isfinite(self.best):
            self.curve.append(CurvePoint(int(grad_evals), self.best))
            if self.logger is not None:
                self.logger.scalar(CURVE_TAG, self.best, int(grad_evals))
        return improved

    def evaluate(self, params: Any) -> FinalMetrics:
        """Val and test loss and accuracy of ``params`` (a non-finite test loss is NaN)."""
        val = self.task.evaluate(params, "val")
        test = self.task.evaluate(params, "test")
        return FinalMetrics(val["loss"], test["loss"], val.get("accuracy"), test.get("accuracy"))

    def result(
        self,
        final: FinalMetrics | None,
        counter: CostCounter | None = None,
        *,
        status: Status = "ok",
        reason: str | None = None,
        **fields: Any,
    ) -> Result:
        """The run's :class:`Result`: the curve, ``final`` metrics and the counter's costs.

        Args:
            final: metrics of the returned weights (None: none, e.g. the run diverged).
            counter: fills ``grad_evals``, ``meta_train_grad_evals`` and ``wall_s``.
            status, reason: the run's status; an ``ok`` run whose final validation loss is
                not finite becomes ``diverged``.
            **fields: any other :class:`Result` field (``best_hparams``, ``extra``, ...,
                or the costs when there is no counter).
        """
        m = final if final is not None else FinalMetrics()
        if status == "ok" and final is not None and not math.isfinite(m.val_loss):
            status, reason = "diverged", "non-finite validation loss"
        costs: dict[str, Any] = {}
        if counter is not None:
            costs = {
                "grad_evals": counter.grad_evals,
                "meta_train_grad_evals": counter.meta_train_grad_evals,
                "wall_s": counter.wall_s,
            }
        fields.setdefault("peak_mem_bytes", peak_memory_bytes(getattr(self.task, "device", None)))
        return Result(
            method=self.method,
            task=self.task.name,
            seed=self.seed,
            val_loss=m.val_loss,
            test_loss=m.test_loss,
            val_accuracy=m.val_accuracy,
            test_accuracy=m.test_accuracy,
            curve=list(self.curve),
            status=status,
            reason=reason,
            **{**costs, **fields},
        )
