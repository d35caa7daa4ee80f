"""Antithetic Gaussian perturbations of φ, shared by the evolution-strategy estimators.

The ES estimators (:mod:`~selfref.meta.estimators.es`, :mod:`~.truncated_es`,
:mod:`~.pes`) perturb φ with ε ~ N(0, σ²I) in antithetic pairs (φ + ε, φ − ε)
(Salimans et al. 2017, §2, antithetic or "mirrored" sampling; Vicol et al. 2021, Alg. 2)
and evaluate every perturbed copy together through ``MetaProblem.unroll(..., per_instance=True)``.

How particles map to instances: each of the b task instances (``meta_batch``) carries
``particles`` = 2q perturbed copies of φ, q antithetic pairs; both halves of a pair run on
the *same* instance (the same initial weights and data stream; google/learned_optimization's
outer trainers do the same), so the pair's loss difference measures φ's perturbation and
not the difference between instances. The n = b·2q trajectories are laid out instance-major:
row (i·q + j)·2 + s is instance i, pair j, sign s (0: +ε, 1: −ε).

Notation: b – instances, q – pairs per instance, n = 2bq – trajectories.
"""

from __future__ import annotations

from typing import Any

import torch
from einops import rearrange, repeat
from torch import Tensor

from selfref.meta.problem import Inner, MetaProblem
from selfref.params import Params

__all__ = ["check_es_options", "sample_pairs", "particle_params", "repeat_inner", "pair_estimate"]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_es_options(sigma: float, particles: int, meta_batch: int) -> None:
    """ValueError unless σ > 0, ``particles`` is an even integer >= 2 and ``meta_batch`` an
    integer >= 1."""
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not sigma > 0:
        raise ValueError(f"sigma must be a number > 0, got {sigma!r}")
    if not _is_int(particles) or particles < 2 or particles % 2:
        raise ValueError(
            f"particles must be an even integer >= 2 (antithetic pairs), got {particles!r}"
        )
    if not _is_int(meta_batch) or meta_batch < 1:
        raise ValueError(f"meta_batch must be an integer >= 1, got {meta_batch!r}")


def sample_pairs(
    meta_params: Params, generator: torch.Generator, instances: int, pairs: int, sigma: float
) -> Params:
    """ε ~ N(0, σ²I) for every pair: {name: (b, q, *shape)}, drawn on the CPU from
    ``generator`` (so a CPU and a CUDA run draw the same numbers) in φ's key order."""
    out = {}
    for k, v in meta_params.items():
        e = torch.randn((instances, pairs, *v.shape), generator=generator, dtype=v.dtype)
        out[k] = (sigma * e).to(v.device)
    return out


def particle_params(meta_params: Params, eps: Params) -> Params:
    """The n perturbed copies φ ± ε of the layout above: {name: (n, *shape)}."""
    out = {}
    for k, v in meta_params.items():
        e = eps[k]  # (b, q, *S)
        both = torch.stack([v.detach() + e, v.detach() - e], dim=2)  # (b, q, 2, *S)
        out[k] = rearrange(both, "b q s ... -> (b q s) ...")
    return out


def _repeat_tree(tree: Any, n: int, times: int, problem: MetaProblem) -> Any:
    if isinstance(tree, dict):
        return {k: _repeat_tree(v, n, times, problem) for k, v in tree.items()}
    if isinstance(tree, Tensor):
        if tree.dim() == 0 or tree.shape[0] != n:
            raise ValueError(
                f"problem {problem.name!r} keeps a carry without one row per trajectory "
                f"(a tensor of shape {tuple(tree.shape)} for {n} trajectories); the "
                "evolution-strategy estimators need one to give each particle its own "
                "trajectory — use tbptt or full_bptt"
            )
        return repeat(tree, "b ... -> (b r) ...", r=times)
    return tree


def repeat_inner(inner: Inner, times: int, problem: MetaProblem) -> Inner:
    """Each of the b trajectories repeated ``times`` times in a row (instance-major)."""
    data = _repeat_tree(inner.data, inner.n, times, problem)
    seeds = [s for s in inner.seeds for _ in range(times)]
    return Inner(data, seeds, inner.t, inner.horizon)


def pair_estimate(
    losses: Tensor, weights: Params, instances: int, pairs: int, sigma: float
) -> tuple[Params, Tensor]:
    """The antithetic estimate mean_{i,j} w_ij (L⁺_ij − L⁻_ij) / (2σ²).

    Args:
        losses: (n,) each trajectory's loss, in the layout above.
        weights: {name: (b, q, *shape)} — ε for ES, the accumulated ξ for PES.
        instances, pairs: b and q.
        sigma: σ.

    Returns:
        The estimate {name: like φ[name]} and the (b, q) loss differences L⁺ − L⁻.
    """
    pm = rearrange(losses.detach(), "(b q s) -> b q s", b=instances, q=pairs, s=2)
    delta = pm[..., 0] - pm[..., 1]  # (b, q)
    grads = {}
    for k, w in weights.items():
        c = delta.reshape(*delta.shape, *([1] * (w.dim() - 2))).to(w.dtype)
        grads[k] = (c * w).mean(dim=(0, 1)) / (2 * sigma**2)
    return grads, delta
