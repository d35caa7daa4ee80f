"""Held-out evaluation: roll a learned modifier or a baseline optimizer over many instances.

Both rollouts run m instances at once with ``torch.func.vmap`` and return the mean loss
curve and the per-instance final loss (see :meth:`TaskFamily.final_loss`). Baselines are the
functional optimizers of :mod:`selfref.optim`; :func:`tune_baseline` picks a learning rate
from a grid by the mean log10 final loss on *training* instances, as Andrychowicz et al.
2016 tune their baselines (section 3).

Notation: m – instances, T – steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from selfref.meta.family import TaskFamily
from selfref.meta.problem import detach_tree
from selfref.net.network import SelfReferentialNet
from selfref.params import Params

__all__ = ["Rollout", "rollout_learned", "rollout_baseline", "tune_baseline", "DEFAULT_LR_GRID"]

# Learning rates tried for each baseline: 10^-4 … 10^0.5 in steps of 10^0.25.
DEFAULT_LR_GRID: tuple[float, ...] = tuple(10 ** (k / 4) for k in range(-16, 3))


@dataclass
class Rollout:
    """Result of optimizing m instances for T steps.

    Attributes:
        curve: (T+1,) mean over instances of Q(θ_t) on batch t (t = T: the final loss).
        final: (m,) per-instance final loss (``TaskFamily.final_loss``).
        params: stacked final weights.
        update_norm: (T,) mean ‖Δθ‖ per step.
    """

    curve: Tensor
    final: Tensor
    params: Params
    update_norm: Tensor

    @property
    def final_log10(self) -> float:
        """Mean over instances of log10 final loss (inf/NaN if any diverged)."""
        return float(torch.log10(self.final.clamp_min(1e-30)).mean())

    @property
    def diverged(self) -> bool:
        return not bool(torch.isfinite(self.final).all())


def rollout_learned(
    net: SelfReferentialNet,
    meta_params: Params,
    family: TaskFamily,
    seeds: Sequence[int],
    steps: int,
    split: str = "val",
) -> Rollout:
    """Optimize the instances ``seeds`` with the learned modifier (no meta-gradient)."""
    phi = detach_tree(meta_params)
    params = family.init_params(seeds)
    state = vmap(lambda p: net.init_state(phi, p, horizon=steps))(params)
    curve, upd = [], []
    with torch.no_grad():
        for t in range(steps):
            params, state, metrics = net.step_many(
                phi, params, state, family.batch(split, t, seeds)
            )
            curve.append(metrics["loss"].mean())
            upd.append(metrics["update_norm"].mean())
        curve.append(family.loss(params, family.batch(split, steps, seeds)).mean())
    final = family.final_loss(params, split, steps, seeds)
    return Rollout(torch.stack(curve), final, params, torch.stack(upd))


def rollout_baseline(
    family: TaskFamily,
    optimizer: str,
    hparams: dict[str, float],
    seeds: Sequence[int],
    steps: int,
    split: str = "val",
) -> Rollout:
    """Optimize the instances ``seeds`` with a functional optimizer from :mod:`selfref.optim`."""
    from selfref.optim import make_optimizer

    opt = make_optimizer(optimizer)
    params = family.init_params(seeds)
    state = vmap(opt.init)(params)
    gv = vmap(grad_and_value(family.task.loss))

    def upd(p: Params, g: Params, s: dict) -> tuple[Params, dict]:
        return opt.update(p, g, s, hparams)

    vupd = vmap(upd)
    curve, norms = [], []
    for t in range(steps):
        grads, loss = gv(params, family.batch(split, t, seeds))
        new, state = vupd(params, grads, state)
        sq = sum(((new[k] - params[k]) ** 2).flatten(1).sum(1) for k in params)
        norms.append(torch.sqrt(sq).mean())  # type: ignore[arg-type]
        params = new
        curve.append(loss.mean())
    with torch.no_grad():
        curve.append(family.loss(params, family.batch(split, steps, seeds)).mean())
    final = family.final_loss(params, split, steps, seeds)
    return Rollout(torch.stack(curve).detach(), final, detach_tree(params), torch.stack(norms))


def tune_baseline(
    family: TaskFamily,
    optimizer: str,
    seeds: Sequence[int],
    steps: int,
    lrs: Sequence[float] = DEFAULT_LR_GRID,
    split: str = "train",
    extra: dict[str, float] | None = None,
) -> tuple[float, dict[float, float]]:
    """Grid-search the learning rate: returns (best lr, {lr: mean log10 final loss}).

    Diverged settings score +inf. Ties go to the smaller learning rate.
    """
    scores: dict[float, float] = {}
    for lr in lrs:
        r = rollout_baseline(family, optimizer, {"lr": lr, **(extra or {})}, seeds, steps, split)
        s = r.final_log10
        scores[lr] = s if math.isfinite(s) and not r.diverged else math.inf
    best = min(scores, key=lambda k: (scores[k], k))
    return best, scores
