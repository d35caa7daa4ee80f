"""RMAD as a method: Adam on metaparameters with exact reversible-learning hypergradients.

Maclaurin, Duvenaud & Adams 2015, "Gradient-based Hyperparameter Optimization through
Reversible Learning", section 3 (meta-optimization of learning-rate and momentum schedules,
regularization and initialization by gradient descent on the validation loss). Each
meta-iteration trains the task for T steps of SGD with momentum from the same seeded
initialization and minibatch order, computes the exact hypergradient of the validation loss
by reversing the training (:func:`selfref.hypergrad.hypergradient`), and takes one Adam step
(Kingma & Ba 2015) on the unconstrained metaparameters (log α, logit γ, log λ, log init
scale).

Costs, in gradient evaluations, charged to the budget *before* each hypergradient: T forward
steps + T recomputed gradients + T Hessian-vector products at 2 each + the meta-objective's
gradient (``ceil(n_val / batch_size)``) — ``4T + m`` per meta-iteration. The method stops
when the next hypergradient would not fit, so it never overspends. T defaults to
``budget.steps_per_trial``; when even one hypergradient of that length does not fit, T is
shrunk to what fits (with a warning).

Guard: the paper notes chaotic, exploding hypergradients at large learning rates. A
hypergradient that is not finite, or whose norm exceeds ``max_hypergrad_norm`` or
``explode_factor`` times the running mean norm, is not applied: the metaparameters go back
to the best seen so far and the meta learning rate is halved. A training run that leaves the
fixed-point range (:class:`~selfref.hypergrad.FixedPointOverflow`) is treated the same way.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from selfref.budget import Budget, CostCounter, reset_peak_memory
from selfref.hypergrad.exact import FixedPointOverflow
from selfref.hypergrad.rmad import (
    META_KINDS,
    hypergradient,
    hypergradient_cost,
    init_meta,
    meta_objective_batch,
    param_groups,
)
from selfref.logging import Logger
from selfref.methods.base import Result, Tracker
from selfref.optim import make_optimizer
from selfref.tasks import Task

__all__ = ["RMAD", "RMADConfig"]


@dataclass(frozen=True)
class RMADConfig:
    """Settings of :class:`RMAD` (defaults follow the paper's schedule experiment).

    Schedules start constant; ``learn`` names the metaparameter kinds Adam updates (the
    others stay at their initial values).
    """

    steps: int | None = None  # inner steps T; None = budget.steps_per_trial
    meta_iters: int | None = None  # meta-iterations; None = as many as the budget allows
    learn: tuple[str, ...] = ("log_alpha", "logit_gamma")  # kinds Adam updates (paper §3.1)
    alpha: float = 1.0  # initial learning rate α (decay-form momentum, w += α v)
    gamma: float = 0.9  # initial momentum decay γ (paper's initial value)
    l2: float = 0.0  # initial L2 coefficient λ (0 = no penalty; must be > 0 to learn it)
    init_scale: float = 1.0  # initial scale of the task's own initialization
    meta_lr: float = 0.1  # Adam step size on the unconstrained metaparameters
    beta1: float = 0.9  # Adam β1
    beta2: float = 0.999  # Adam β2
    max_hypergrad_norm: float = 1e3  # guard: a larger hypergradient norm is not applied
    explode_factor: float = 20.0  # guard: nor one above this × the running mean norm
    by: str = "layer"  # metaparameter groups: "layer" (l{i}.weight+bias) or "tensor"
    meta_split: str = "val"  # split of the meta-objective

    def __post_init__(self) -> None:
        unknown = [k for k in self.learn if k not in META_KINDS]
        if unknown:
            raise ValueError(f"unknown metaparameter kinds {unknown}; valid: {META_KINDS}")
        if "log_l2" in self.learn and not self.l2 > 0:
            raise ValueError(f"learning log_l2 needs an initial l2 > 0, got l2={self.l2}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 or None, got {self.steps}")
        if self.meta_iters is not None and self.meta_iters < 1:
            raise ValueError(f"meta_iters must be >= 1 or None, got {self.meta_iters}")
        if not self.meta_lr > 0:
            raise ValueError(f"meta_lr must be > 0, got {self.meta_lr}")
        if self.by not in ("layer", "tensor"):
            raise ValueError(f"unknown grouping {self.by!r}; valid: layer, tensor")
        if self.meta_split not in ("train", "val"):
            raise ValueError(f"unknown meta_split {self.meta_split!r}; valid: train, val")


class RMAD:
    """Adam on metaparameters with exact reversible-learning hypergradients (Maclaurin 2015).

    Args:
        **options: fields of :class:`RMADConfig` (e.g. ``steps=100, meta_lr=0.1``).

    Example:
        >>> from selfref.budget import Budget
        >>> from selfref.tasks import make
        >>> task = make("digits-logreg", batch_size=50)
        >>> res = RMAD(steps=10).run(task, Budget(200, steps_per_trial=10), seed=0)
        >>> res.grad_evals <= 200, res.extra["meta_iters"]
        (True, 4)
    """

    name: ClassVar[str] = "rmad"
    options_class: ClassVar[type] = RMADConfig  # its fields are the options

    def __init__(self, **options: Any) -> None:
        valid = {f.name for f in fields(RMADConfig)}
        bad = sorted(set(options) - valid)
        if bad:
            raise ValueError(f"unknown rmad options {bad}; valid: {', '.join(sorted(valid))}")
        if "learn" in options and isinstance(options["learn"], str):
            options["learn"] = tuple(s for s in options["learn"].split(",") if s)
        self.config = RMADConfig(**options)

    def run(
        self, task: Task, budget: Budget, logger: Logger | None = None, seed: int = 0
    ) -> Result:
        cfg = self.config
        counter = CostCounter(budget)
        reset_peak_memory(task.device)
        res = Result(method=self.name, task=task.name, seed=seed)
        tracker = Tracker(self.name, task, seed, logger)
        _, meta_cost = meta_objective_batch(task, cfg.meta_split, seed)
        steps = cfg.steps or budget.steps_per_trial
        if hypergradient_cost(steps, meta_cost) > budget.grad_evals:
            fit = (budget.grad_evals - meta_cost) // 4
            if fit < 1:
                res.status = "failed"
                res.reason = (
                    f"budget of {budget.grad_evals} gradient evaluations is below one "
                    f"hypergradient (4·T + {meta_cost} with T >= 1)"
                )
                res.wall_s = counter.wall_s
                return res
            warnings.warn(
                f"rmad: one hypergradient with T={steps} costs "
                f"{hypergradient_cost(steps, meta_cost)} > budget {budget.grad_evals}; "
                f"using T={fit}",
                RuntimeWarning,
                stacklevel=2,
            )
            steps = fit
        cost = hypergradient_cost(steps, meta_cost)
        groups = param_groups(task.init_params(torch.Generator().manual_seed(seed)), cfg.by)
        meta = init_meta(steps, groups, cfg.alpha, cfg.gamma, 1.0, cfg.init_scale, task.device)
        if cfg.l2 == 0.0:
            meta["log_l2"] = torch.full_like(meta["log_l2"], -math.inf)
        else:
            meta["log_l2"] = torch.full_like(meta["log_l2"], math.log(cfg.l2))
        adam = make_optimizer("adam")
        learned = {k: meta[k] for k in cfg.learn}
        state = adam.init(learned)
        lr = cfg.meta_lr
        best_loss, best_meta, best_params = math.inf, _clone(meta), None
        mean_norm: float | None = None
        n_guard = n_overflow = it = 0
        bits: list[float] = []
        while (cfg.meta_iters is None or it < cfg.meta_iters) and counter.can_spend(cost):
            it += 1
            try:
                hg = hypergradient(
                    task,
                    meta,
                    seed,
                    method="rmad",
                    meta_split=cfg.meta_split,
                    by=cfg.by,
                    counter=counter,
                )
            except FixedPointOverflow as e:
                n_overflow += 1
                lr = self._recover(meta, best_meta, lr, f"training overflowed ({e})", logger, it)
                learned = {k: meta[k] for k in cfg.learn}
                state = adam.init(learned)
                tracker.observe(counter.grad_evals)
                if best_params is None:  # the initial metaparameters already fail
                    break
                continue
            bits.append(hg.stats["buffer_bits_per_param_step"])
            if math.isfinite(hg.meta_loss) and hg.meta_loss < best_loss:
                best_loss, best_meta, best_params = hg.meta_loss, _clone(meta), hg.params
            tracker.observe(counter.grad_evals, hg.meta_loss)
            grads = {k: hg.grads[k] for k in cfg.learn}
            norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
            if logger is not None:
                logger.scalar("meta/loss", hg.meta_loss, it)
                logger.scalar("meta/train_loss", hg.train_loss, it)
                logger.scalar("meta/grad_norm", norm, it)
                logger.scalar("meta/lr", lr, it)
                self._log_meta(logger, meta, groups.names, it)
            limit = cfg.max_hypergrad_norm
            if mean_norm is not None:
                limit = min(limit, cfg.explode_factor * mean_norm)
            if not math.isfinite(hg.meta_loss) or not math.isfinite(norm) or norm > limit:
                n_guard += 1
                lr = self._recover(
                    meta, best_meta, lr, f"hypergradient norm {norm:.3g} > {limit:.3g}", logger, it
                )
                learned = {k: meta[k] for k in cfg.learn}
                state = adam.init(learned)
                continue
            mean_norm = norm if mean_norm is None else 0.9 * mean_norm + 0.1 * norm
            learned, state = adam.update(
                learned, grads, state, {"lr": lr, "beta1": cfg.beta1, "beta2": cfg.beta2}
            )
            meta.update({k: v.detach() for k, v in learned.items()})

        extra = {
            "meta_iters": it,
            "steps": steps,
            "hypergrad_cost": cost,
            "guard_triggers": n_guard,
            "overflows": n_overflow,
            "final_meta_lr": lr,
            "groups": list(groups.names),
            "buffer_bits_per_param_step": sum(bits) / len(bits) if bits else None,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "schedules": _summary(best_meta),
        }
        if best_params is None:
            reason = (
                "no meta-iteration produced a finite validation loss (the initial step size "
                f"alpha={self.config.alpha:g} may diverge on this task; set a smaller one with "
                "--method-option rmad.alpha=...)"
            )
            return tracker.result(None, counter, status="diverged", reason=reason, extra=extra)
        best_hparams = {
            "alpha_mean": float(torch.exp(best_meta["log_alpha"]).mean()),
            "gamma_mean": float(torch.sigmoid(best_meta["logit_gamma"]).mean()),
            "l2_mean": float(torch.exp(best_meta["log_l2"]).mean()),
            "init_scale_mean": float(torch.exp(best_meta["log_init_scale"]).mean()),
        }
        res = tracker.result(
            tracker.evaluate(best_params), counter, best_hparams=best_hparams, extra=extra
        )
        if logger is not None:
            logger.hparams(res.best_hparams, {"val/loss": res.val_loss, "test/loss": res.test_loss})
            logger.flush()
        return res

    @staticmethod
    def _recover(
        meta: dict[str, Tensor],
        best: dict[str, Tensor],
        lr: float,
        why: str,
        logger: Logger | None,
        it: int,
    ) -> float:
        """Guard: back to the best metaparameters, half the meta learning rate."""
        warnings.warn(
            f"rmad meta-iteration {it}: {why}; reverting to the best metaparameters and "
            f"halving the meta learning rate to {lr / 2:.3g}",
            RuntimeWarning,
            stacklevel=3,
        )
        meta.update(_clone(best))
        if logger is not None:
            logger.text("meta/guard", why, it)
        return lr / 2

    @staticmethod
    def _log_meta(logger: Logger, meta: dict[str, Tensor], names: tuple[str, ...], it: int) -> None:
        alpha = torch.exp(meta["log_alpha"]).mean(0)  # (G,) mean over steps
        gamma = torch.sigmoid(meta["logit_gamma"]).mean(0)  # (G,)
        for gi, name in enumerate(names):
            logger.scalar(f"hparams/alpha_mean/{name}", alpha[gi], it)
            logger.scalar(f"hparams/gamma_mean/{name}", gamma[gi], it)


def _clone(meta: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in meta.items()}


def _summary(meta: dict[str, Tensor]) -> dict[str, Any]:
    """JSON-able metaparameters: α and γ schedules (T, G) as nested lists, λ and s per group."""
    return {
        "alpha": torch.exp(meta["log_alpha"]).tolist(),
        "gamma": torch.sigmoid(meta["logit_gamma"]).tolist(),
        "l2": torch.exp(meta["log_l2"]).tolist(),
        "init_scale": torch.exp(meta["log_init_scale"]).tolist(),
    }
