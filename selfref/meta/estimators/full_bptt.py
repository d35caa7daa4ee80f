"""Full-horizon backpropagation through time.

Each estimate starts ``meta_batch`` fresh trajectories and backpropagates through all T
steps of their horizon: the exact gradient of the mean meta-loss Σ_{t=1}^{T} ℓ_t of the
sampled instances (Andrychowicz et al. 2016, section 2, eq. 1, before truncation; the
"full BPTT" baseline of Vicol, Metz & Sohl-Dickstein 2021, section 5).

Bias and variance: unbiased for the sampled instances' meta-objective; variance from
instance and minibatch sampling only. Memory grows linearly in T and gradients through long
chaotic unrolls can explode (Metz et al. 2019), which is why the truncated and
evolution-strategy estimators exist. One update per T steps of compute.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from selfref.meta.estimators.base import Estimate, grads_or_zeros
from selfref.meta.problem import MetaProblem
from selfref.params import Params

__all__ = ["FullBPTT"]


class FullBPTT:
    """Backpropagation through the whole horizon of ``meta_batch`` fresh trajectories.

    Args:
        meta_batch: n, trajectories per estimate.
    """

    name: ClassVar[str] = "full_bptt"

    def __init__(self, meta_batch: int = 128) -> None:
        if meta_batch < 1:
            raise ValueError(f"meta_batch must be >= 1, got {meta_batch}")
        self.meta_batch = meta_batch

    def init(
        self, problem: MetaProblem, meta_params: Params, generator: torch.Generator, step: int
    ) -> dict[str, Any]:
        return {}

    def estimate(
        self,
        problem: MetaProblem,
        meta_params: Params,
        state: dict[str, Any],
        generator: torch.Generator,
        horizon: int,
        step: int,
    ) -> Estimate:
        inner = problem.init_inner(meta_params, generator, self.meta_batch, horizon, step)
        leaves = {k: v.detach().requires_grad_(True) for k, v in meta_params.items()}
        tr = problem.unroll(leaves, inner, inner.horizon)
        loss = tr.loss.mean()
        return Estimate(
            grads=grads_or_zeros(loss, leaves),
            meta_loss=float(loss.detach()),
            state={},
            grad_evals=tr.grad_evals + tr.backward_evals,
            metrics=dict(tr.metrics),
        )
