"""Truncated Persistent Evolution Strategies with antithetic pairs.

Vicol, Metz & Sohl-Dickstein 2021, "Unbiased gradient estimation in unrolled computation
graphs with persistent evolution strategies", §4 and Alg. 2 (PES with antithetic
sampling). Every particle keeps its *own* trajectory: particle i runs truncation τ under
φ + ε_τ^i with a fresh ε_τ^i ~ N(0, σ²I) from the state its own earlier perturbations led
to, and accumulates its perturbations ξ^i ← ξ^i + ε_τ^i. The estimate of truncation τ is

    ĝ_τ = 1/(b q) Σ_{i,j} ξ_ij (L_τ(φ + ε_ij) − L_τ(φ − ε_ij)) / (2σ²),

with the antithetic partner of a particle always perturbed by −ε (so its accumulator is
−ξ, stored once per pair) and both halves of a pair on the same task instance (see
:mod:`~selfref.meta.estimators.antithetic`). When a trajectory reaches its horizon it is
replaced by a fresh instance and its ξ is reset to zero (as the paper's reference code
resets its particles, and learned_optimization's ``TruncatedPES`` switches to a fresh
accumulator). All trajectories advance in lockstep (the "lockstep" schedule of the paper's
reference code): the trainer's meta-steps cycle through the horizon's T/K truncations
together.

Bias and variance: the sum Σ_τ ĝ_τ over the T/K truncations of a trajectory is an unbiased
estimate of the gradient of the Gaussian-smoothed full-horizon objective
E_{ε_1..ε_{T/K}} Σ_τ L_τ(φ + ε_τ) (one perturbation per truncation) — no truncation bias,
whatever K is (§4); that smoothed gradient differs from ∇L(φ) by O(σ²) for a smooth L and
not at all when L is quadratic in φ. The price is variance: ξ grows like σ√τ along the
trajectory, so ĝ_τ also carries the noise of all earlier perturbations; the variance grows
with the number of truncations T/K and with how strongly early truncations influence
later losses, and exceeds truncated ES's (§4, variance analysis; in practice PES is lower
bias but higher variance than truncated ES, as learned_optimization's docstring notes).
Antithetic pairs cancel the even-order terms of L, which removes the loss level from the
estimate. No backpropagation; one update per K steps.

Cost: the forward steps of the b·2q particle trajectories (``Truncation.grad_evals``), no
backward.
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

__all__ = ["PES"]


class PES:
    """Truncated PES over ``meta_batch`` instances × ``particles`` persistent particles.

    Args:
        sigma: σ, the perturbation scale (learned_optimization's default 0.01).
        particles: persistent particles per instance, even (antithetic pairs).
        unroll: K, steps per truncation.
        meta_batch: b, task instances (each carries ``particles`` trajectories).
    """

    name: ClassVar[str] = "pes"

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
        return {"inner": None, "xi": None}

    def _fresh(
        self,
        problem: MetaProblem,
        meta_params: Params,
        generator: torch.Generator,
        horizon: int,
        step: int,
    ) -> tuple[Inner, Params]:
        """New instances, each repeated for its particles, and ξ = 0."""
        b, q = self.meta_batch, self.particles // 2
        inner = problem.init_inner(meta_params, generator, b, horizon, step)
        xi = {k: v.new_zeros((b, q, *v.shape)) for k, v in meta_params.items()}
        return repeat_inner(inner, self.particles, problem), xi

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
            inner, xi = self._fresh(problem, meta_params, generator, horizon, step)
        else:
            xi = state["xi"]
        length = min(self.unroll, inner.remaining)
        eps = sample_pairs(meta_params, generator, b, q, self.sigma)  # (b, q, *S)
        with torch.no_grad():
            tr = problem.unroll(particle_params(meta_params, eps), inner, length, per_instance=True)
        xi = {k: xi[k] + eps[k] for k in eps}  # ξ ← ξ + ε (Alg. 2), before the estimate
        grads, delta = pair_estimate(tr.loss, xi, b, q, self.sigma)
        return Estimate(
            grads=grads,
            meta_loss=float(tr.loss.mean()),
            state={"inner": tr.inner.detached().to_dict(), "xi": xi},
            grad_evals=tr.grad_evals,
            metrics={
                **tr.metrics,
                "es/abs_delta": float(delta.abs().mean()),
                "pes/xi_norm": float(  # root mean square ‖ξ‖ over the pairs
                    torch.stack([(v.double() ** 2).sum() for v in xi.values()])
                    .sum()
                    .div(b * q)
                    .sqrt()
                ),
            },
        )
