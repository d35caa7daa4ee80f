"""Truncated backpropagation through time (Andrychowicz et al. 2016, section 3).

The inner trajectories are run in truncations of K steps; each truncation's meta-loss is
differentiated by backpropagation through its K steps only, and the carry is detached
before the next truncation. A trajectory that reaches its horizon T is replaced by fresh
instances. Andrychowicz et al. use K = 20 over T = 100 (quadratics, 128 instances).

Bias and variance: biased whenever K < T — the gradient ignores how φ's effect on the carry
changes the losses of later truncations, and favours greedy, short-horizon behaviour (Wu et
al. 2018, "Understanding short-horizon bias in stochastic meta-optimization"); with K = T it
is exact (:mod:`~selfref.meta.estimators.full_bptt`). Its variance is the minibatch and
instance sampling only (no perturbation noise), the lowest of the estimators here, but
gradients through long unrolls can explode (Metz et al. 2019, "Understanding and correcting
pathologies in the training of learned optimizers").

Cost: the forward steps (``Truncation.grad_evals``) plus their backward
(``Truncation.backward_evals``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from selfref.meta.estimators.base import Estimate, grads_or_zeros
from selfref.meta.problem import Inner, MetaProblem
from selfref.params import Params

__all__ = ["TruncatedBPTT"]


class TruncatedBPTT:
    """Truncated BPTT over ``meta_batch`` trajectories, K = ``unroll`` steps per estimate.

    Args:
        unroll: K, steps per truncation (paper: 20).
        meta_batch: n, trajectories per estimate (paper, quadratics: 128).
    """

    name: ClassVar[str] = "tbptt"

    def __init__(self, unroll: int = 20, meta_batch: int = 128) -> None:
        if unroll < 1:
            raise ValueError(f"unroll must be >= 1, got {unroll}")
        if meta_batch < 1:
            raise ValueError(f"meta_batch must be >= 1, got {meta_batch}")
        self.unroll = unroll
        self.meta_batch = meta_batch

    def init(
        self, problem: MetaProblem, meta_params: Params, generator: torch.Generator, step: int
    ) -> dict[str, Any]:
        return {"inner": None}

    def _length(self, inner: Inner) -> int:
        return min(self.unroll, inner.remaining)

    def estimate(
        self,
        problem: MetaProblem,
        meta_params: Params,
        state: dict[str, Any],
        generator: torch.Generator,
        horizon: int,
        step: int,
    ) -> Estimate:
        inner = None if state.get("inner") is None else Inner.from_dict(state["inner"])
        if inner is None or inner.done:
            inner = problem.init_inner(meta_params, generator, self.meta_batch, horizon, step)
        leaves = {k: v.detach().requires_grad_(True) for k, v in meta_params.items()}
        tr = problem.unroll(leaves, inner, self._length(inner))
        loss = tr.loss.mean()
        grads = grads_or_zeros(loss, leaves)
        return Estimate(
            grads=grads,
            meta_loss=float(loss.detach()),
            state={"inner": tr.inner.detached().to_dict()},
            grad_evals=tr.grad_evals + tr.backward_evals,
            metrics=dict(tr.metrics),
        )
