"""Budget and the one cost counter every method spends through.

The unit of cost is one **gradient evaluation**: a forward and backward pass of the normal
model on one minibatch. A Hessian-vector product counts 2; a forward-only evaluation of a
whole split counts as ``ceil(n / batch_size)`` forward passes at 1/2 each only where a method
chooses to charge it (see each method's docstring). A learned optimizer's meta-training is
charged to a separate ``meta_train`` account so it is reported beside the budget, never hidden
in it. Wall seconds and peak memory are recorded beside the counts.

Meta-training costs (:mod:`selfref.meta.estimators`): every inner step is charged what it
costs forward, even when nothing is backpropagated — a step of a learned optimizer takes one
gradient of the normal model per trajectory (1, since that gradient is its input), a step
that needs only a forward pass (a sequence learner's, a toy linear system's) ½.
Backpropagating through a step (truncated or full BPTT) adds its
backward, about one more gradient evaluation, so BPTT pays forward + backward per step and
per trajectory. Evolution strategies (ES, truncated ES, PES) run forward only: they pay the
forward cost of every particle's trajectory (truncated ES also that of its unperturbed
carry) and no backward. Each :class:`~selfref.meta.problem.Truncation` reports the two parts
(``grad_evals``, ``backward_evals``) and each estimator adds what it ran.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

__all__ = ["Budget", "BudgetExceeded", "CostCounter", "peak_memory_bytes", "reset_peak_memory"]


class BudgetExceeded(RuntimeError):
    """Raised when a method asks for more gradient evaluations than its budget has left."""


@dataclass(frozen=True)
class Budget:
    """What a method may spend.

    Args:
        grad_evals: maximum gradient evaluations (the unit of cost) for the search itself.
        steps_per_trial: inner training steps of one trial (one full training run), used by
            search methods to size their trials; methods that do not train in trials ignore it.
        meta_train_grad_evals: separate allowance for meta-training a learned optimizer
            (None = no limit, but the spend is still counted and reported).
    """

    grad_evals: int  # total gradient evaluations for the search / training
    steps_per_trial: int = 100  # inner steps of one training run
    meta_train_grad_evals: int | None = None  # separate, reported meta-training allowance

    def __post_init__(self) -> None:
        if self.grad_evals < 1:
            raise ValueError(f"budget grad_evals must be >= 1, got {self.grad_evals}")
        if self.steps_per_trial < 1:
            raise ValueError(f"budget steps_per_trial must be >= 1, got {self.steps_per_trial}")
        if self.meta_train_grad_evals is not None and self.meta_train_grad_evals < 0:
            raise ValueError(
                f"budget meta_train_grad_evals must be >= 0, got {self.meta_train_grad_evals}"
            )

    @property
    def max_trials(self) -> int:
        """How many full training runs of ``steps_per_trial`` steps fit in the budget."""
        return self.grad_evals // self.steps_per_trial

    def require_trial(self) -> None:
        """Raise ValueError unless at least one full training run fits in the budget."""
        if self.max_trials < 1:
            raise ValueError(
                f"budget of {self.grad_evals} gradient evaluations is smaller than one trial "
                f"of {self.steps_per_trial} steps"
            )


@dataclass
class CostCounter:
    """Counts gradient evaluations against a :class:`Budget` and refuses to overspend.

    ``spend(n)`` raises :class:`BudgetExceeded` *before* recording if ``n`` would exceed the
    budget, so a method can check ``can_spend`` first or catch the exception and stop.
    """

    budget: Budget
    grad_evals: int = 0
    meta_train_grad_evals: int = 0
    start_time: float = field(default_factory=time.perf_counter)

    @property
    def remaining(self) -> int:
        return self.budget.grad_evals - self.grad_evals

    def can_spend(self, n: int = 1) -> bool:
        return self.grad_evals + n <= self.budget.grad_evals

    def spend(self, n: int = 1) -> None:
        """Charge ``n`` gradient evaluations (a Hessian-vector product is 2)."""
        if n < 0:
            raise ValueError(f"cannot spend a negative cost, got {n}")
        if not self.can_spend(n):
            raise BudgetExceeded(
                f"spending {n} gradient evaluations would exceed the budget "
                f"({self.grad_evals} spent of {self.budget.grad_evals})"
            )
        self.grad_evals += n

    def spend_meta_train(self, n: int = 1) -> None:
        """Charge meta-training cost to its own account (reported, never mixed in)."""
        if n < 0:
            raise ValueError(f"cannot spend a negative cost, got {n}")
        cap = self.budget.meta_train_grad_evals
        if cap is not None and self.meta_train_grad_evals + n > cap:
            raise BudgetExceeded(
                f"meta-training would exceed its allowance ({self.meta_train_grad_evals} + {n} "
                f"> {cap})"
            )
        self.meta_train_grad_evals += n

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.start_time


def reset_peak_memory(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """Peak CUDA memory on ``device`` if it is a GPU, else the process's peak RSS."""
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
