"""The gradient-estimator interface every meta-gradient estimator implements.

An estimator turns a :class:`~selfref.meta.problem.MetaProblem` and φ into an estimate of
∂L/∂φ, advancing the inner trajectories it owns (google/learned_optimization's
``GradientEstimator``: ``init_worker_state`` / ``compute_gradient_estimate``). Its state —
the carries of its trajectories and, for PES, the accumulated perturbations — is a plain
dict of tensors, ints and lists, so the trainer checkpoints it as part of the training state
and a resume continues bit for bit.

Every estimator reports what it spent in gradient evaluations (:mod:`selfref.budget`): the
forward cost of the inner steps it ran, plus the backward cost where it backpropagates.

Notation: n – instances, P – particles, K – truncation length, T – horizon.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from selfref.meta.problem import MetaProblem
from selfref.params import Params

__all__ = ["Estimate", "GradientEstimator", "grads_or_zeros"]


@dataclass
class Estimate:
    """One meta-gradient estimate.

    Attributes:
        grads: {name: tensor like φ[name]} — the estimate of ∂L/∂φ (mean over instances).
        meta_loss: the mean meta-loss of the trajectories it ran (for logging).
        state: the estimator's next state (plain data).
        grad_evals: what it cost, in gradient evaluations.
        metrics: scalars to log.
    """

    grads: Params
    meta_loss: float
    state: dict[str, Any]
    grad_evals: float
    metrics: dict[str, float] = field(default_factory=dict)


class GradientEstimator(Protocol):
    """``init`` a state, then ``estimate`` repeatedly.

    Attributes:
        name: registry name (``selfref meta-train --estimator NAME``).
    """

    name: str

    def init(
        self, problem: MetaProblem, meta_params: Params, generator: torch.Generator, step: int
    ) -> dict[str, Any]:
        """The estimator's state before its first estimate (may be empty: built lazily)."""
        ...

    def estimate(
        self,
        problem: MetaProblem,
        meta_params: Params,
        state: dict[str, Any],
        generator: torch.Generator,
        horizon: int,
        step: int,
    ) -> Estimate:
        """One estimate at φ from ``state``; ``generator`` is this step's stream.

        Args:
            problem: the meta-problem.
            meta_params: φ (leaves; the estimator makes its own differentiable copies).
            state: from :meth:`init` or the previous estimate.
            generator: randomness of this meta-step (fresh instances, perturbations).
            horizon: T for trajectories started now (a curriculum may change it).
            step: the meta-step (problems with a schedule over meta-steps read it).
        """
        ...


def grads_or_zeros(loss: Tensor, leaves: Params) -> Params:
    """∂loss/∂leaves, zeros for leaves the loss does not reach."""
    keys = list(leaves)
    gs = torch.autograd.grad(loss, [leaves[k] for k in keys], allow_unused=True)
    return {k: g if g is not None else torch.zeros_like(leaves[k]) for k, g in zip(keys, gs)}
