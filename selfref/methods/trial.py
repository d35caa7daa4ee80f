"""The trial function every search method shares: train once with one point, evaluate.

A *trial* is one full :func:`selfref.train.train` run of ``request.steps`` steps with one
point of a :class:`~selfref.search_space.SearchSpace`, followed by the val and test
evaluation of its final weights. It costs the gradient evaluations it took (a diverged run
stops early and is charged only what it spent). :func:`run_trial` runs in whatever process
an executor (:mod:`selfref.execution`) puts it in and returns its *record*, a JSON-able
dict with status ``ok`` / ``diverged`` / ``failed`` and a reason; a trial that raises is
recorded as failed with the exception, and the search goes on.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from selfref.budget import Budget, CostCounter
from selfref.tasks import Task

__all__ = ["TrialRequest", "Record", "TrialFn", "run_trial", "failed_record", "warmup"]

Record = dict[str, Any]
TrialFn = Callable[[Task, "TrialRequest"], Record]


@dataclass(frozen=True)
class TrialRequest:
    """What one trial needs besides the task (sent to a worker as a small pickle).

    Args:
        optimizer: inner optimizer name (the space's).
        hparams: the point to train with (optimizer hyperparameters and ``l2``).
        steps: training steps of the trial.
        seed: seeds the initial weights and the minibatch order (the study's seed, so every
            trial of a study sees the same initialization and data order).
    """

    optimizer: str  # inner optimizer
    hparams: Mapping[str, Any]  # the trial's point
    steps: int  # inner training steps
    seed: int  # training seed


def failed_record(reason: str, **extra: Any) -> Record:
    """The record of a trial that produced no result (raised, lost its worker, timed out)."""
    return {
        "status": "failed",
        "reason": reason,
        "val_loss": None,
        "val_accuracy": None,
        "test_loss": None,
        "test_accuracy": None,
        "grad_evals": 0,
        "compute_s": 0.0,
        "pid": None,
        **extra,
    }


def run_trial(task: Task, request: TrialRequest) -> Record:
    """Train once with ``request.hparams`` and evaluate val and test; never raises.

    Returns:
        A record with ``status`` (``ok``, ``diverged`` or ``failed``), ``reason``,
        ``val_loss``, ``val_accuracy``, ``test_loss``, ``test_accuracy`` (None where not
        available or not finite), ``grad_evals`` (steps actually taken), ``compute_s`` and
        ``pid``. An exception becomes ``status="failed"`` with its type, message and traceback.
    """
    return train_and_evaluate(task, request.optimizer, request.hparams, request.steps, request.seed)


def train_and_evaluate(
    task: Task,
    optimizer: str,
    hparams: Mapping[str, Any],
    steps: int,
    seed: int,
    *,
    start: int = 0,
    params: Any = None,
    opt_state: Any = None,
    keep_state: bool = False,
) -> Record:
    """Train ``steps`` steps (continuing from ``start``, ``params`` and ``opt_state`` when
    given), then evaluate val and test; never raises. The record of :func:`run_trial`; with
    ``keep_state`` also ``state``, the weights and optimizer state to continue from (None
    unless the run finished ok)."""
    from selfref.train import train

    t0 = time.perf_counter()
    counter = CostCounter(Budget(steps, steps))
    rec: Record = {
        "status": "ok",
        "reason": None,
        "val_loss": None,
        "val_accuracy": None,
        "test_loss": None,
        "test_accuracy": None,
        "grad_evals": 0,
        "pid": os.getpid(),
    }
    if keep_state:
        rec["state"] = None
    hp = {k: v for k, v in hparams.items() if k != "l2"}
    l2 = float(hparams.get("l2", 0.0))
    try:
        out = train(
            task,
            optimizer,
            hp,
            steps,
            seed,
            counter=counter,
            params=params,
            l2=l2,
            opt_state=opt_state,
            start_step=start,
        )
        rec["grad_evals"] = out.grad_evals
        if out.status != "ok":
            rec["status"] = "diverged"
            rec["reason"] = f"non-finite training loss at step {start + (out.diverged_step or 0)}"
        else:
            val = task.evaluate(out.params, "val")
            if not math.isfinite(val["loss"]):
                rec["status"], rec["reason"] = "diverged", "non-finite validation loss"
            else:
                test = task.evaluate(out.params, "test")
                rec["val_loss"] = val["loss"]
                rec["val_accuracy"] = val.get("accuracy")
                rec["test_loss"] = test["loss"] if math.isfinite(test["loss"]) else None
                rec["test_accuracy"] = test.get("accuracy")
                if keep_state:
                    rec["state"] = {"params": out.params, "opt_state": out.opt_state}
    except Exception as e:  # recorded with its reason; the search goes on
        rec["status"] = "failed"
        rec["reason"] = f"{type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc(limit=8)
        rec["grad_evals"] = counter.grad_evals
    rec["compute_s"] = time.perf_counter() - t0
    return rec


def warmup() -> None:
    """One training step on a tiny task, so a worker pays one-off costs (lazy imports, first
    kernels) at start and not inside its first trial's compute time."""
    from selfref.tasks import make
    from selfref.train import train

    train(make("quadratic"), "sgd", {"lr": 1e-3}, steps=1, seed=0)
