"""Antithetic evolution strategies over the full horizon.

Each estimate starts ``meta_batch`` fresh task instances, runs ``particles`` perturbed
copies φ ± ε of φ on each (antithetic pairs share their instance, see
:mod:`~selfref.meta.estimators.antithetic`) forward through all T steps of the horizon, and
returns

    ĝ = 1/(b q) Σ_{i,j} ε_ij (L(φ + ε_ij) − L(φ − ε_ij)) / (2σ²),   ε_ij ~ N(0, σ²I),

the antithetic ("mirrored") ES estimator of Salimans et al. 2017, "Evolution strategies as
a scalable alternative to reinforcement learning", §2, with its antithetic sampling),
applied to the whole unrolled computation as Vicol, Metz & Sohl-Dickstein 2021 use it
(their full-unroll ES; google/learned_optimization's ``FullES``). L is the meta-loss of
the whole trajectory, the same Σ_{t=1}^{T} ℓ_t that
:mod:`~selfref.meta.estimators.full_bptt` differentiates.

Bias and variance: unbiased for the gradient of the Gaussian-smoothed objective
E_ε L(φ + ε) (of the sampled instances); that differs from ∇L(φ) by O(σ²) for a smooth L
and not at all for an L quadratic in φ (antithetic pairs cancel every even-order term).
No backpropagation: it works where gradients through the unroll explode or do not exist,
and smoothing helps on chaotic loss surfaces (Metz et al. 2019). Its variance does not
grow with T through the estimator itself, but it is that of a zeroth-order estimate: for a
locally linear L its covariance is (‖∇L‖² I + ∇L ∇Lᵀ) / (b q), a total of
(dim φ + 1)·‖∇L‖² / (b q), so it needs many particles when φ is large. One update per T
steps of compute, like full BPTT.

Cost: the forward steps of all b·2q trajectories (``Truncation.grad_evals``), no backward.
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
from selfref.meta.problem import MetaProblem
from selfref.params import Params

__all__ = ["ES"]


class ES:
    """Antithetic ES over the whole horizon of ``meta_batch`` fresh instances.

    Args:
        sigma: σ, the perturbation scale (learned_optimization's default 0.01).
        particles: perturbed copies of φ per instance, even (antithetic pairs); 2 = one
            pair per instance (learned_optimization's ``FullES``).
        meta_batch: b, task instances per estimate.
    """

    name: ClassVar[str] = "es"

    def __init__(self, sigma: float = 0.01, particles: int = 2, meta_batch: int = 128) -> None:
        check_es_options(sigma, particles, meta_batch)
        self.sigma, self.particles, self.meta_batch = sigma, particles, meta_batch

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
        b, q = self.meta_batch, self.particles // 2
        inner = problem.init_inner(meta_params, generator, b, horizon, step)
        eps = sample_pairs(meta_params, generator, b, q, self.sigma)  # (b, q, *S)
        with torch.no_grad():
            tr = problem.unroll(
                particle_params(meta_params, eps),
                repeat_inner(inner, self.particles, problem),
                inner.horizon,
                per_instance=True,
            )
        grads, delta = pair_estimate(tr.loss, eps, b, q, self.sigma)
        return Estimate(
            grads=grads,
            meta_loss=float(tr.loss.mean()),
            state={},
            grad_evals=tr.grad_evals,
            metrics={**tr.metrics, "es/abs_delta": float(delta.abs().mean())},
        )
