"""Truncated evolution strategies: antithetic ES on each truncation of K steps.

The estimator keeps ``meta_batch`` trajectories advanced under the unperturbed φ. Each
estimate starts ``particles`` perturbed copies φ ± ε from every trajectory's current state
s_{τ−1} (antithetic pairs on the same instance, see
:mod:`~selfref.meta.estimators.antithetic`), runs them K steps, and returns

    ĝ_τ = 1/(b q) Σ_{i,j} ε_ij (L_τ(s_{τ−1}, φ + ε_ij) − L_τ(s_{τ−1}, φ − ε_ij)) / (2σ²),

where L_τ is the meta-loss of the K steps; then the trajectories advance K steps under φ
itself, and the particles' states are dropped (Vicol, Metz & Sohl-Dickstein 2021: the
truncated ES that PES corrects; their reference code advances the shared state
under the unperturbed θ, as here). A trajectory that reaches its horizon is replaced by a
fresh instance.

Bias and variance: biased whenever K < T, like truncated BPTT — it is ES on the
truncation's loss with the carry s_{τ−1} held fixed, so it ignores how φ changed s_{τ−1}
and inherits truncated BPTT's short-horizon bias (Vicol et al. 2021; Wu et al. 2018).
Its expectation is the gradient of the Gaussian-smoothed truncated loss, which equals
truncated BPTT's gradient when the truncation's loss is quadratic in φ. Its variance is
that of ES over K steps only, the lowest of the ES estimators here (for a locally linear
L_τ, covariance (‖∇L_τ‖² I + ∇L_τ ∇L_τᵀ) / (b q)). No backpropagation; one update per K
steps.

Cost: the forward steps of the b·2q particles plus the b unperturbed trajectories
(``Truncation.grad_evals`` of both), no backward.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from selfref.meta.estimators.antithetic import (
    check_es_options,
    pair_estimate,
    particle_params,
    repeat_inner,
    sample_pairs,
)
from selfref.meta.estimators.base import Estimate
from selfref.meta.problem import Inner, MetaProblem
from selfref.params import Params

__all__ = ["TruncatedES"]


class TruncatedES:
    """Antithetic ES on truncations of K = ``unroll`` steps of ``meta_batch`` trajectories.

    Args:
        sigma: σ, the perturbation scale (learned_optimization's default 0.01).
        particles: perturbed copies of φ per trajectory, even (antithetic pairs).
        unroll: K, steps per truncation.
        meta_batch: b, trajectories (task instances) advanced under φ.
    """

    name: ClassVar[str] = "truncated_es"

    def __init__(
        self, sigma: float = 0.01, particles: int = 2, unroll: int = 20, meta_batch: int = 128
    ) -> None:
        check_es_options(sigma, particles, meta_batch)
        if unroll < 1:
            raise ValueError(f"unroll must be >= 1, got {unroll}")
        self.sigma, self.particles, self.unroll, self.meta_batch = (
            sigma,
            particles,
            unroll,
            meta_batch,
        )

    def init(
        self, problem: MetaProblem, meta_params: Params, generator: torch.Generator, step: int
    ) -> dict[str, Any]:
        return {"inner": None}

    def estimate(
        self,
        problem: MetaProblem,
        meta_params: Params,
        state: dict[str, Any],
        generator: torch.Generator,
        horizon: int,
        step: int,
    ) -> Estimate:
        b, q = self.meta_batch, self.particles // 2
        inner = None if state.get("inner") is None else Inner.from_dict(state["inner"])
        if inner is None or inner.done:
            inner = problem.init_inner(meta_params, generator, b, horizon, step)
        length = min(self.unroll, inner.remaining)
        eps = sample_pairs(meta_params, generator, b, q, self.sigma)  # (b, q, *S)
        phi = {k: v.detach() for k, v in meta_params.items()}
        with torch.no_grad():
            tr = problem.unroll(
                particle_params(phi, eps),
                repeat_inner(inner, self.particles, problem),
                length,
                per_instance=True,
            )
            mean = problem.unroll(phi, inner, length)  # the carry advances under φ itself
        grads, delta = pair_estimate(tr.loss, eps, b, q, self.sigma)
        return Estimate(
            grads=grads,
            meta_loss=float(tr.loss.mean()),
            state={"inner": mean.inner.detached().to_dict()},
            grad_evals=tr.grad_evals + mean.grad_evals,
            metrics={**tr.metrics, "es/abs_delta": float(delta.abs().mean())},
        )
