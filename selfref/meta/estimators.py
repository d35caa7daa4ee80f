"""Meta-gradient estimators: one interface, truncated backpropagation through time.

An estimator owns the *inner* trajectories (m task instances being optimized by the
self-referential net) and, given φ, returns an estimate of ∂L/∂φ and the advanced carry
(the shape of google/learned_optimization's ``GradientEstimator``, where full BPTT,
truncated BPTT, ES and PES share one interface). Implemented here:

- :class:`TruncatedBPTT` — Andrychowicz et al. 2016, section 3: unrolls of ``unroll`` steps
  over trajectories of ``horizon`` steps; the carry is detached between truncations; a
  trajectory that reaches its horizon is replaced by fresh instances. With
  ``unroll == horizon`` it is full backpropagation through the trajectory.

The carry (:class:`InnerState`) is a plain dataclass of tensors and ints, so it can be
checkpointed and restored exactly (resume == uninterrupted run).

Notation: m – instances per meta-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from selfref.meta.family import TaskFamily
from selfref.meta.unroll import unroll
from selfref.net.network import NetState, SelfReferentialNet, split_meta_params
from selfref.params import Params

__all__ = ["InnerState", "Estimate", "Estimator", "TruncatedBPTT", "detach_tree"]


def detach_tree(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: detach_tree(v) for k, v in tree.items()}
    if isinstance(tree, Tensor):
        return tree.detach()
    return tree


@dataclass
class InnerState:
    """The carry of m inner trajectories between truncations.

    Attributes:
        params: stacked weights {name: (m, *S)} (detached).
        state: stacked net state (detached).
        seeds: the m instance seeds.
        t: steps taken so far on these instances.
        horizon: steps after which the instances are replaced.
    """

    params: Params
    state: NetState
    seeds: list[int]
    t: int
    horizon: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "state": self.state,
            "seeds": list(self.seeds),
            "t": self.t,
            "horizon": self.horizon,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InnerState:
        return cls(d["params"], d["state"], list(d["seeds"]), int(d["t"]), int(d["horizon"]))


@dataclass
class Estimate:
    """One meta-gradient estimate and what was measured along the way."""

    grads: Params
    meta_loss: float
    inner: InnerState
    grad_evals: int  # inner gradient evaluations spent (m × steps)
    metrics: dict[str, float] = field(default_factory=dict)
    update_norm: Tensor | None = None  # (m, T)
    losses: Tensor | None = None  # (m, T+1)


class Estimator(Protocol):
    """``estimate(meta_params, inner, generator, horizon) -> Estimate``."""

    def estimate(
        self,
        meta_params: Params,
        inner: InnerState | None,
        generator: torch.Generator,
        horizon: int,
    ) -> Estimate: ...


class TruncatedBPTT:
    """Truncated BPTT over the unrolled self-modification (Andrychowicz et al. 2016, §3).

    Args:
        net: the self-referential network.
        family: the task family instances are drawn from.
        unroll: T, steps per truncation (paper: 20).
        meta_batch: m, instances per meta-batch (paper, quadratics: 128).
        split: the split batches come from during meta-training.
        meta_loss: ``"sum"`` (paper) or ``"log_sum"`` (see :func:`~selfref.meta.unroll.unroll`).
        mode: ``"vmap"`` or ``"loop"``.
    """

    def __init__(
        self,
        net: SelfReferentialNet,
        family: TaskFamily,
        unroll: int = 20,
        meta_batch: int = 128,
        split: str = "train",
        meta_loss: str = "sum",
        mode: str = "vmap",
    ) -> None:
        if unroll < 1:
            raise ValueError(f"unroll must be >= 1, got {unroll}")
        if meta_batch < 1:
            raise ValueError(f"meta_batch must be >= 1, got {meta_batch}")
        self.net = net
        self.family = family
        self.unroll = unroll
        self.meta_batch = meta_batch
        self.split = split
        self.meta_loss = meta_loss
        self.mode = mode

    def init_inner(
        self, meta_params: Params, generator: torch.Generator, horizon: int
    ) -> InnerState:
        """Fresh instances: seeds drawn from ``generator`` in [0, 2^30)."""
        seeds = torch.randint(0, 2**30, (self.meta_batch,), generator=generator).tolist()
        params = self.family.init_params(seeds)
        state = torch.func.vmap(self.net.init_state, in_dims=(None, 0))(
            detach_tree(meta_params), params
        )
        return InnerState(params, state, seeds, 0, horizon)

    def estimate(
        self,
        meta_params: Params,
        inner: InnerState | None,
        generator: torch.Generator,
        horizon: int,
    ) -> Estimate:
        if inner is None or inner.t >= inner.horizon:
            inner = self.init_inner(meta_params, generator, horizon)
        length = min(self.unroll, inner.horizon - inner.t)
        seeds = inner.seeds

        def batch_fn(t: int) -> Any:
            return self.family.batch(self.split, t, seeds)

        out = unroll(
            self.net,
            meta_params,
            inner.params,
            inner.state,
            batch_fn,
            inner.t,
            length,
            meta_loss=self.meta_loss,
            mode=self.mode,
        )
        total = out.meta_loss
        metrics: dict[str, float] = {}
        _, eval_phi = split_meta_params(meta_params)
        if eval_phi:
            val_loss = self.family.loss(
                detach_tree(out.params), self.family.batch("val", inner.t + length, seeds)
            ).detach()  # (m,)
            feats = torch.stack(
                [
                    torch.log10(out.final_loss.clamp_min(1e-12)),
                    torch.log10(out.grad_norm.clamp_min(1e-12)),
                    torch.full_like(out.final_loss, (inner.t + length) / inner.horizon),
                ],
                dim=-1,
            )  # (m, 3)
            pred = self.net.evaluation.predict_value(eval_phi, feats)  # (m,)
            target = torch.log10(val_loss.clamp_min(1e-12))
            value_mse = ((pred - target) ** 2).mean()
            total = total + self.net.evaluation.config.value_weight * value_mse
            metrics["value/mse"] = float(value_mse.detach())
            # R² of the estimate on this meta-batch (1 − MSE / variance of the target)
            var = float(target.var(unbiased=False))
            metrics["value/r2"] = 1.0 - float(value_mse.detach()) / var if var > 0 else float("nan")
        keys = list(meta_params)
        grads = torch.autograd.grad(total, [meta_params[k] for k in keys], allow_unused=True)
        grad_dict = {
            k: g if g is not None else torch.zeros_like(meta_params[k]) for k, g in zip(keys, grads)
        }
        new_inner = InnerState(
            detach_tree(out.params), detach_tree(out.state), seeds, inner.t + length, inner.horizon
        )
        metrics["inner/final_loss"] = float(out.final_loss.mean())
        for k, v in out.core_metrics.items():  # the core's internals, mean over instances
            metrics[f"core/{k}"] = float(v.double().mean())
        return Estimate(
            grads=grad_dict,
            meta_loss=float(total.detach()),
            inner=new_inner,
            grad_evals=self.meta_batch * length,
            metrics=metrics,
            update_norm=out.update_norm,
            losses=out.losses,
        )
