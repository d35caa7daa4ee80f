"""Meta-problem: a learned optimizer (the self-referential net's modifier) on a task family.

Andrychowicz et al. 2016, sections 2–3: φ are the modifier's weights; an inner trajectory
is one task instance (its initial weights and data stream fixed by a seed, see
:class:`~selfref.meta.family.TaskFamily`) optimized by θ_{t+1} = θ_t + g(∇θQ(θ_t), φ); the
meta-loss of a truncation is Σ_t w_t Q(θ_t) over its steps (:func:`~selfref.meta.unroll.unroll`).
m instances run at once through ``SelfReferentialNet.step_many`` (``torch.func.vmap``).

Options beside the paper: ``meta_loss="log_sum"`` (Σ log Q, weighs late, small losses as
much as early ones) and ``objective="heldout"`` (the meta-loss reads Q on held-out
minibatches of the val split; Metz et al. 2020 meta-train on such an outer-validation loss).

The held-out evaluation rolls φ out on ``eval_tasks`` instances whose seeds lie above the
training stream's range [0, 2^30), scoring the mean log10 final loss on the ``eval_split``
(:func:`~selfref.meta.evaluate.rollout_learned`).

Cost (:mod:`selfref.budget`): every inner step takes one gradient of the normal model per
instance (1 gradient evaluation, also in forward-only ES); backpropagating through a step
costs about one more.

Notation: m – instances, K – truncation length.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from selfref.meta.evaluate import rollout_learned
from selfref.meta.family import TaskFamily
from selfref.meta.problem import Inner, Truncation, detach_tree
from selfref.meta.unroll import META_LOSSES, MODES, OBJECTIVES, unroll
from selfref.net.network import SelfReferentialNet, split_meta_params
from selfref.params import Params
from selfref.tasks.base import Batch

__all__ = ["LearnedOptimizerProblem", "EVAL_SEED_BASE"]

EVAL_SEED_BASE = 2**31  # held-out instance seeds: EVAL_SEED_BASE + i, above [0, 2^30)


class LearnedOptimizerProblem:
    """Meta-train the modifier of ``net`` on instances of its task.

    Args:
        net: the self-referential network (its normal model is the task).
        meta_loss: ``"sum"`` (paper) or ``"log_sum"``.
        objective: ``"train"`` (paper) or ``"heldout"``.
        split: the split inner trajectories train on.
        mode: ``"vmap"`` or a Python ``"loop"`` over instances (same numbers).
        eval_tasks, eval_steps, eval_split: the held-out evaluation (instances, horizon,
            split).
    """

    name = "learned_optimizer"

    def __init__(
        self,
        net: SelfReferentialNet,
        *,
        meta_loss: str = "sum",
        objective: str = "train",
        split: str = "train",
        mode: str = "vmap",
        eval_tasks: int = 100,
        eval_steps: int = 100,
        eval_split: str = "val",
    ) -> None:
        for name, value, valid in (
            ("meta_loss", meta_loss, META_LOSSES),
            ("objective", objective, OBJECTIVES),
            ("mode", mode, MODES),
        ):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        if eval_tasks < 1 or eval_steps < 1:
            raise ValueError(
                f"eval_tasks and eval_steps must be >= 1, got {eval_tasks}, {eval_steps}"
            )
        self.net = net
        self.task = net.normal.task
        self.family = TaskFamily(self.task)
        self.meta_loss, self.objective, self.split, self.mode = meta_loss, objective, split, mode
        self.eval_seeds = [EVAL_SEED_BASE + i for i in range(eval_tasks)]
        self.eval_steps, self.eval_split = eval_steps, eval_split
        self.device, self.dtype = self.task.device, self.task.dtype

    # -- the protocol ----------------------------------------------------------------------

    def init_meta_params(self, generator: torch.Generator) -> Params:
        phi = self.net.init_meta_params(generator)
        return {k: v.to(device=self.device, dtype=self.dtype) for k, v in phi.items()}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "task": self.task.name,
            "net": self.net.describe(),
            "meta_loss": self.meta_loss,
            "objective": self.objective,
            "split": self.split,
        }

    def init_inner(
        self, meta_params: Params, generator: torch.Generator, n: int, horizon: int, step: int
    ) -> Inner:
        """n fresh instances, seeds drawn from ``generator`` in [0, 2^30)."""
        seeds = torch.randint(0, 2**30, (n,), generator=generator).tolist()
        params = self.family.init_params(seeds)
        phi = detach_tree(meta_params)
        state = vmap(lambda p: self.net.init_state(phi, p, horizon=horizon))(params)
        return Inner({"params": params, "state": state}, seeds, 0, horizon)

    def batch(self, t: int, seeds: list[int]) -> Batch:
        """Stacked minibatch t of the instances (with a held-out one when it is read)."""
        b: Any = self.family.batch(self.split, t, seeds)
        if self.objective == "heldout":
            b = {**b, "heldout": self.family.batch("val", t, seeds)}
        return b

    def unroll(
        self, meta_params: Params, inner: Inner, length: int, per_instance: bool = False
    ) -> Truncation:
        inner.check_truncation(length)
        seeds = inner.seeds
        out = unroll(
            self.net,
            meta_params,
            inner.data["params"],
            inner.data["state"],
            lambda t: self.batch(t, seeds),
            inner.t,
            length,
            meta_loss=self.meta_loss,
            mode=self.mode,
            per_instance=per_instance,
            objective=self.objective,
        )
        loss = out.per_instance_loss
        metrics: dict[str, float] = {
            "inner/final_loss": float(out.final_loss.mean()),
            "modify/update_norm": float(out.update_norm.mean()),
        }
        _, eval_phi = split_meta_params(meta_params)
        if eval_phi:  # the learned value model (EvaluationConfig.learned_value)
            err, target = self._value_error(eval_phi, out, inner, length, per_instance)  # (m,)
            loss = loss + self.net.evaluation.config.value_weight * err
            mse = float(err.detach().mean())
            metrics["value/mse"] = mse
            var = float(target.var(unbiased=False))
            metrics["value/r2"] = 1.0 - mse / var if var > 0 else float("nan")
        for k, v in out.core_metrics.items():  # the core's internals, mean over instances
            if v.numel() == inner.n or v.dim() <= 1:
                metrics[f"core/{k}"] = float(v.double().mean())
        m = inner.n
        return Truncation(
            loss=loss,
            inner=Inner(
                {"params": out.params, "state": out.state}, seeds, inner.t + length, inner.horizon
            ),
            grad_evals=float(m * length),
            backward_evals=float(m * length),
            metrics=metrics,
            per_step=out.losses,
        )

    def _value_error(
        self, eval_phi: Params, out: Any, inner: Inner, length: int, per_instance: bool
    ) -> tuple[Tensor, Tensor]:
        """(squared error, target) of the value model's log10 val-loss estimate at the end."""
        seeds = inner.seeds
        val = self.family.loss(
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
        if per_instance:
            pred = vmap(self.net.evaluation.predict_value)(eval_phi, feats)
        else:
            pred = self.net.evaluation.predict_value(eval_phi, feats)  # (m,)
        target = torch.log10(val.clamp_min(1e-12))
        return (pred - target) ** 2, target

    def evaluate(self, meta_params: Params) -> dict[str, float]:
        r = rollout_learned(
            self.net, meta_params, self.family, self.eval_seeds, self.eval_steps, self.eval_split
        )
        score = r.final_log10 if not r.diverged else math.inf
        return {
            "score": score,
            "final_log10_loss": score,
            "final_loss": float(r.final.mean()),
            "grad_evals": float(len(self.eval_seeds) * self.eval_steps),
        }

    def rollout(self, meta_params: Params, steps: int | None = None) -> Any:
        """The held-out rollout itself (curves, per-step update norms) for logging."""
        return rollout_learned(
            self.net,
            meta_params,
            self.family,
            self.eval_seeds,
            steps or self.eval_steps,
            self.eval_split,
        )
