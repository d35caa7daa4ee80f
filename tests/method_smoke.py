"""A reusable smoke test for Method implementations (the contract of selfref/methods/base.py).

Every method's test module calls :func:`check_method` once; whatever the method does
inside, it checks what ``selfref compare`` relies on:

- ``run`` returns a :class:`~selfref.methods.Result` naming the method, task and seed, with
  status ok and a finite validation loss (and test loss);
- it spends at most the budget: ``0 < grad_evals <= budget.grad_evals``;
- the curve is best-so-far validation loss against gradient evaluations: gradient
  evaluations non-decreasing and within what was spent, losses finite and non-increasing,
  and it ends where the spending ends (``curve[-1].grad_evals == grad_evals``);
- ``to_dict`` is strict JSON and round-trips through ``Result.from_dict``;
- optionally (``count_batches=True``, for methods whose training runs in this process and
  fetches one training minibatch per gradient evaluation, e.g. the search methods with
  ``workers=0``) the number of training minibatches fetched equals ``grad_evals``.

Example:
    import pytest
    smoke = pytest.importorskip("method_smoke")  # tests/ is on sys.path under pytest
    smoke.check_method(MyMethod(), make("digits-logreg"), Budget(400, 20), seed=0)
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

from selfref.budget import Budget, CostCounter
from selfref.logging import Logger, MemoryLogger
from selfref.methods.base import CurvePoint, Result
from selfref.tasks import Task

__all__ = ["check_method", "CountingTask", "ConstantMethod", "StrictOptionsMethod"]


class CountingTask:
    """Wraps a task and counts the training minibatches fetched through it (in this process)."""

    def __init__(self, inner: Task) -> None:
        self.inner = inner
        self.train_batches = 0

    def batch(self, split: str, step: int, seed: int) -> Any:
        if split == "train":
            self.train_batches += 1
        return self.inner.batch(split, step, seed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def check_method(
    method: Any,
    task: Task,
    budget: Budget,
    seed: int = 0,
    *,
    logger: Logger | None = None,
    count_batches: bool = False,
) -> Result:
    """Run ``method`` once and check the Method contract; returns the Result for more checks.

    Args:
        method: a Method instance.
        task: the task to run it on (kept small by the caller).
        budget: the budget; the method must not exceed it.
        seed: the run's seed.
        logger: passed to ``run`` (default: a fresh MemoryLogger).
        count_batches: also check that training minibatches fetched in this process equal
            the reported gradient evaluations.
    """
    wrapped: Any = CountingTask(task) if count_batches else task
    res = method.run(wrapped, budget, logger if logger is not None else MemoryLogger(), seed)
    assert isinstance(res, Result), f"run returned {type(res).__name__}, not a Result"
    assert res.method == type(method).name, (res.method, type(method).name)
    assert res.task == task.name and res.seed == seed
    assert res.status == "ok", f"status {res.status}: {res.reason}"
    assert math.isfinite(res.val_loss), f"val loss {res.val_loss}"
    assert math.isfinite(res.test_loss), f"test loss {res.test_loss}"
    assert 0 < res.grad_evals <= budget.grad_evals, (res.grad_evals, budget.grad_evals)
    assert res.meta_train_grad_evals >= 0
    assert res.curve, "empty curve"
    gs = [p.grad_evals for p in res.curve]
    vs = [p.best_val_loss for p in res.curve]
    assert all(isinstance(p, CurvePoint) for p in res.curve)
    assert all(a <= b for a, b in zip(gs, gs[1:])), f"curve grad evals not sorted: {gs}"
    assert gs[0] > 0 and gs[-1] == res.grad_evals, (gs, res.grad_evals)
    assert all(math.isfinite(v) for v in vs), vs
    assert all(b <= a for a, b in zip(vs, vs[1:])), f"best-so-far curve increases: {vs}"
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    back = Result.from_dict(d)
    assert back.grad_evals == res.grad_evals and back.curve == res.curve
    if count_batches:
        assert wrapped.train_batches == res.grad_evals, (wrapped.train_batches, res.grad_evals)
    return res


class ConstantMethod:
    """A stand-in Method for harness tests: trains nothing, spends ``cost`` through a counter.

    Its val/test loss is ``value`` (``fail=True`` makes ``run`` raise instead). It takes no
    ``executor``/``space``/``workers``, like the gradient-based methods added later.
    """

    name: ClassVar[str] = "constant"

    def __init__(self, value: float = 1.0, cost: int = 10, fail: bool = False) -> None:
        self.value = value
        self.cost = cost
        self.fail = fail

    def run(
        self, task: Task, budget: Budget, logger: Logger | None = None, seed: int = 0
    ) -> Result:
        if self.fail:
            raise RuntimeError("constant method asked to fail")
        counter = CostCounter(budget)
        counter.spend(min(self.cost, budget.grad_evals))
        v = self.value + 0.01 * seed
        res = Result(method=self.name, task=task.name, seed=seed, val_loss=v, test_loss=v)
        res.grad_evals = counter.grad_evals
        res.curve = [CurvePoint(counter.grad_evals, v)]
        res.meta_train_grad_evals = 5
        if logger is not None:
            logger.hparams({"value": self.value}, {"own/metric": v})
        return res


class StrictOptionsMethod(ConstantMethod):
    """Takes ``**options`` and rejects any it does not know (as config-driven methods do)."""

    name: ClassVar[str] = "strict"

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - {"value"})
        if unknown:
            raise ValueError(f"unknown strict options {unknown}; valid: value")
        super().__init__(value=options.get("value", 1.0))
