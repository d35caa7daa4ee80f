"""Plain functional training: one task, one functional optimizer, fixed hyperparameters.

:func:`train` is the inner loop every baseline shares (a grid- or random-search trial is one
call): initial params from ``task.init_params(Generator(seed))``, minibatch ``t`` is
``task.batch("train", t, seed)``, gradients by reverse mode (``torch.autograd.grad`` on
fresh leaf copies of the params) of ``task.loss`` (+ an optional L2 penalty), updates
from :mod:`selfref.optim`. Each step charges one gradient evaluation to the cost counter.
A NaN/inf loss ends the run with status ``"diverged"`` instead of raising, so a search can
record the trial and go on.

The same seed gives bitwise-equal parameters and curves (on the CPU; on CUDA as far as the
task's kernels are deterministic).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from selfref.budget import CostCounter
from selfref.logging import Logger
from selfref.optim import DEFAULT_HPARAMS, FunctionalOptimizer, make_optimizer, resolve_hparams
from selfref.params import Params, all_finite
from selfref.tasks.base import Batch, Task

__all__ = ["TrainResult", "train", "l2_penalty", "l2_coefficients"]


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
        params: final parameters (on divergence: those whose loss was non-finite, unchanged).
        losses: training minibatch loss (the task's loss, without the L2 penalty) at each step,
            evaluated before that step's update; on divergence the last entry is the
            non-finite one.
        val_losses: ``(step, val loss)`` after every ``eval_every`` updates, if asked.
        steps: steps actually taken (gradient evaluations made, = ``len(losses)``).
        status: ``"ok"`` or ``"diverged"``.
        diverged_step: the 0-based step whose loss was NaN/inf (``steps`` if only the final
            parameters are non-finite), else None.
        grad_evals: gradient evaluations spent (= ``steps``).
        opt_state: the optimizer's state after the last update (to continue the run).
    """

    params: Params
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    steps: int = 0
    status: str = "ok"
    diverged_step: int | None = None
    grad_evals: int = 0
    opt_state: Any = None


def l2_coefficients(
    params: Mapping[str, Tensor], l2: float | Mapping[str, float]
) -> dict[str, float]:
    """Per-tensor L2 coefficients.

    A float applies to every *weight*: every tensor whose name does not end in ``bias``
    (biases are not decayed, the usual convention). A mapping gives each tensor its own
    coefficient by name; tensors it does not name get 0.

    Raises:
        ValueError: a negative or non-finite coefficient, or a name that is not a parameter.
    """
    if isinstance(l2, Mapping):
        unknown = sorted(set(l2) - set(params))
        if unknown:
            raise ValueError(f"l2 names unknown parameters {unknown}; valid: {', '.join(params)}")
        coefs = {k: float(l2.get(k, 0.0)) for k in params}
    else:
        coefs = {k: (0.0 if k.endswith("bias") else float(l2)) for k in params}
    for k, c in coefs.items():
        if not (math.isfinite(c) and c >= 0):
            raise ValueError(f"l2 coefficient for {k!r} must be finite and >= 0, got {c}")
    return {k: c for k, c in coefs.items() if c != 0.0}


def l2_penalty(params: Mapping[str, Tensor], coefs: Mapping[str, float]) -> Tensor | float:
    """``Σ_k 0.5 · l2_k · ‖θ_k‖²`` over the tensors named in ``coefs`` (0.0 if none)."""
    total: Tensor | float = 0.0
    for k, c in coefs.items():
        total = total + 0.5 * c * (params[k] * params[k]).sum()
    return total


def train(
    task: Task,
    optimizer: str | FunctionalOptimizer,
    hparams: Mapping[str, float],
    steps: int,
    seed: int,
    *,
    params: Params | None = None,
    counter: CostCounter | None = None,
    logger: Logger | None = None,
    log_every: int = 1,
    eval_every: int | None = None,
    progress: bool = False,
    l2: float | Mapping[str, float] = 0.0,
    opt_state: Any = None,
    start_step: int = 0,
) -> TrainResult:
    """Train ``task`` for ``steps`` steps with a functional optimizer and fixed hyperparameters.

    Args:
        task: what to learn (see :class:`selfref.tasks.Task`).
        optimizer: a name from :data:`selfref.optim.OPTIMIZERS` or a FunctionalOptimizer.
        hparams: the optimizer's hyperparameters (missing ones take
            :data:`selfref.optim.DEFAULT_HPARAMS`), e.g. ``{"lr": 0.01}``.
        steps: number of updates (>= 1).
        seed: seeds the initial parameters and the minibatch order.
        params: start here instead of ``task.init_params(Generator(seed))`` (not modified).
        counter: charged 1 per step before the step; its BudgetExceeded propagates.
        logger: receives ``inner/loss`` every ``log_every`` steps and ``val/loss``,
            ``val/accuracy`` every ``eval_every`` steps.
        log_every: logging period of ``inner/loss`` in steps.
        eval_every: if given, evaluate the val split after every ``eval_every`` updates.
        progress: show a tqdm progress bar.
        l2: L2 penalty ``0.5 · l2 · ‖w‖²`` added to the loss; see :func:`l2_coefficients`.
        opt_state, start_step: continue an earlier run: with its ``params``, ``opt_state``
            and the number of steps it took, the updates and minibatches are exactly those
            steps ``start_step ..`` of one uninterrupted run (multi-fidelity rungs).

    Returns:
        A :class:`TrainResult`. Divergence (NaN/inf loss) is a status, not an exception.

    Raises:
        ValueError: ``steps < 1``, ``log_every < 1``, ``eval_every < 1``, an unknown
            optimizer or hyperparameter, a non-positive lr, a bad ``l2``.

    Example:
        >>> from selfref.tasks import make
        >>> r = train(make("quadratic"), "sgd", {"lr": 0.01}, steps=50, seed=0)
        >>> r.status, r.losses[-1] < r.losses[0]
        ('ok', True)
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be >= 1 or None, got {eval_every}")
    opt = make_optimizer(optimizer) if isinstance(optimizer, str) else optimizer
    if opt.name in DEFAULT_HPARAMS:
        hp = resolve_hparams(opt.name, hparams)  # validates names and ranges (lr > 0, ...)
    else:
        hp = dict(hparams)
    if params is None:
        params = task.init_params(torch.Generator().manual_seed(seed))
    params = dict(params)
    coefs = l2_coefficients(params, l2)

    def grad_fn(p: Params, batch: Batch) -> tuple[Params, tuple[Tensor, Tensor]]:
        # Plain reverse mode on fresh leaves: train() never differentiates through its own
        # updates, and torch.autograd.grad costs half of torch.func.grad_and_value per step.
        leaves = {k: v.detach().requires_grad_(True) for k, v in p.items()}
        data_loss = task.loss(leaves, batch)
        total = data_loss + l2_penalty(leaves, coefs) if coefs else data_loss
        grads = torch.autograd.grad(
            total, list(leaves.values()), allow_unused=True, materialize_grads=True
        )
        return dict(zip(leaves, grads)), (total.detach(), data_loss.detach())

    state = opt.init(params) if opt_state is None else dict(opt_state)
    result = TrainResult(params=params)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"train {task.name} {opt.name}", leave=False)
    try:
        for t in range(steps):
            if counter is not None:
                counter.spend(1)
            grads, (total, data_loss) = grad_fn(params, task.batch("train", start_step + t, seed))
            loss_t, total_t = torch.stack([data_loss, total.detach()]).tolist()  # one sync
            result.losses.append(loss_t)
            result.steps = result.grad_evals = t + 1
            if not (math.isfinite(loss_t) and math.isfinite(total_t)):
                result.status, result.diverged_step = "diverged", t
                break
            if logger is not None and t % log_every == 0:
                logger.scalar("inner/loss", loss_t, t)
            with torch.no_grad():
                params, state = opt.update(params, grads, state, hp)
            if eval_every is not None and (t + 1) % eval_every == 0:
                metrics = task.evaluate(params, "val")
                result.val_losses.append((t + 1, metrics["loss"]))
                if logger is not None:
                    for name, value in metrics.items():
                        logger.scalar(f"val/{name}", value, t + 1)
            if bar is not None:
                bar.update(1)
                if t % max(1, steps // 100) == 0:
                    bar.set_postfix(loss=f"{loss_t:.4g}")
    finally:
        if bar is not None:
            bar.close()
    if result.status == "ok" and not all_finite(params):
        result.status, result.diverged_step = "diverged", steps
    result.params = params
    result.opt_state = state
    return result
