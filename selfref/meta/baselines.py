"""Hand-designed optimizers over a grid of settings, every setting and seed at once, tuned on val.

The references a learned optimizer is measured against (VeLO, Metz et al. 2022, section 5:
"learning-rate-tuned Adam"): :func:`run_grid` trains S settings × R seeds of one task on its
train split for T steps under ``torch.func.vmap`` (each instance with its own hyperparameters)
and records the final loss on the whole val and test splits, and optionally the val- and
test-loss curves; :func:`best_setting` picks the setting with the lowest mean final *val* loss
(never test), a diverged seed making its setting ineligible; :func:`early_stopped` does the same
for early stopping on val (each instance keeps its weights from its lowest-val curve point).

Schedules: ``constant`` (the learning rate as given) and ``cosine`` — lr · ½(1 + cos(π t/T))
at step t of T, annealed to 0 at the end without warm-up (Loshchilov & Hutter 2017, SGDR,
equation 5 with one cycle and η_min = 0), the schedule a tuned baseline would most often get.

Optimizers: ``adam`` and ``momentum`` (SGD with heavy-ball momentum 0.9) as in
:mod:`selfref.optim` (``torch.optim.Adam`` / ``torch.optim.SGD`` exactly), ``sgd``, and
``adamw`` — Adam with decoupled weight decay, ``torch.optim.AdamW``: θ ← θ(1 − lr·λ) before
Adam's step (Loshchilov & Hutter 2019, Algorithm 2).

Notation: S – settings, R – seeds (instances per setting), T – steps, C – curve points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad_and_value, vmap

from selfref.meta.family import TaskFamily
from selfref.optim import make_optimizer
from selfref.params import Params

__all__ = [
    "GridRun",
    "run_grid",
    "best_setting",
    "early_stopped",
    "GRID_OPTIMIZERS",
    "SCHEDULES",
    "log_grid",
]

GRID_OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "momentum", "sgd")
SCHEDULES: tuple[str, ...] = ("constant", "cosine")


def schedule_factor(schedule: str, t: int, steps: int) -> float:
    """The multiplier of the learning rate at step ``t`` (0-based) of ``steps``."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t / steps))
    raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


def log_grid(low: float, high: float, points: int) -> list[float]:
    """``points`` log-spaced values from ``low`` to ``high`` (both included)."""
    if points < 2 or not 0 < low < high:
        raise ValueError(f"want 0 < low < high and points >= 2, got {low}, {high}, {points}")
    return [low * (high / low) ** (i / (points - 1)) for i in range(points)]


@dataclass
class GridRun:
    """What :func:`run_grid` measured.

    Attributes:
        settings: the S hyperparameter dicts.
        val, test: (S, R) final loss on the whole val / test split (inf where diverged).
        curve_steps: the C steps at which the curves were measured.
        curve: (S, R, C) test loss along the run (empty when not asked for).
        val_curve: (S, R, C) val loss at the same steps (what early stopping would read).
        train: (S, R) final loss on the whole train split: with test it tells underfitting
            (both high) from overfitting (train low, test high).
    """

    settings: list[dict[str, float]]
    val: Tensor
    test: Tensor
    curve_steps: list[int]
    curve: Tensor
    val_curve: Tensor
    train: Tensor


def _update_fn(optimizer: str) -> tuple:
    """(init, update(params, grads, state, hparams)) for one instance."""
    if optimizer not in GRID_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(GRID_OPTIMIZERS)}")
    base = make_optimizer("adam" if optimizer == "adamw" else optimizer)

    def update(p: Params, g: Params, s: dict, h: dict[str, Tensor]) -> tuple[Params, dict]:
        if optimizer == "adamw":
            wd = h["weight_decay"]
            p = {k: v * (1 - h["lr"] * wd) for k, v in p.items()}
            h = {"lr": h["lr"]}
        return base.update(p, g, s, h)

    return base.init, update


def _full_loss(
    family: TaskFamily, params: Params, split: str, steps: int, seeds: list[int]
) -> Tensor:
    out = family.final_loss(params, split, steps, seeds)
    return torch.where(torch.isfinite(out), out, torch.full_like(out, math.inf))


def run_grid(
    family: TaskFamily,
    optimizer: str,
    settings: Sequence[dict[str, float]],
    seeds: Sequence[int],
    steps: int,
    curve_points: int = 0,
    schedule: str = "constant",
) -> GridRun:
    """Train every (setting, seed) pair for ``steps`` steps on the train split.

    Args:
        family: the task (an instance is fixed by its seed: init and minibatch order).
        optimizer: one of :data:`GRID_OPTIMIZERS`.
        settings: S dicts of hyperparameters (``lr``; ``weight_decay`` for adamw; ``momentum``
            for momentum, default 0.9).
        seeds: R instance seeds, the same for every setting.
        steps: T.
        curve_points: measure the val and test loss at this many evenly spaced steps (0 = none).
        schedule: one of :data:`SCHEDULES`; it scales every setting's ``lr`` (decoupled
            weight decay, lr · λ per step, follows it as in ``torch.optim.AdamW``).
    """
    schedule_factor(schedule, 0, max(steps, 1))  # a bad name fails before any work
    settings = [dict(s) for s in settings]
    if optimizer == "momentum":
        settings = [{"momentum": 0.9, **s} for s in settings]
    S, R = len(settings), len(seeds)
    inst = [int(s) for _ in range(S) for s in seeds]  # (S·R,) instance seeds, setting-major
    init, update = _update_fn(optimizer)
    params = family.init_params(inst)
    state = vmap(init)(params)
    ref = next(iter(params.values()))
    hp = {
        k: torch.tensor([s[k] for s in settings for _ in seeds], dtype=ref.dtype, device=ref.device)
        for k in settings[0]
    }
    gv = vmap(grad_and_value(family.task.loss))
    vupd = vmap(update)
    every = max(1, steps // curve_points) if curve_points else 0
    curve_steps: list[int] = []
    curve: list[Tensor] = []
    val_curve: list[Tensor] = []
    for t in range(steps):
        grads, _ = gv(params, family.batch("train", t, inst))
        f = schedule_factor(schedule, t, steps)
        params, state = vupd(params, grads, state, hp if f == 1.0 else {**hp, "lr": hp["lr"] * f})
        if every and ((t + 1) % every == 0 or t + 1 == steps) and len(curve_steps) < curve_points:
            curve_steps.append(t + 1)
            curve.append(_full_loss(family, params, "test", t + 1, inst))
            val_curve.append(_full_loss(family, params, "val", t + 1, inst))
    val = _full_loss(family, params, "val", steps, inst).reshape(S, R)
    test = _full_loss(family, params, "test", steps, inst).reshape(S, R)
    train = _full_loss(family, params, "train", steps, inst).reshape(S, R)

    def stack(points: list[Tensor]) -> Tensor:
        return torch.stack(points, dim=-1).reshape(S, R, -1) if points else torch.empty(S, R, 0)

    return GridRun(settings, val, test, curve_steps, stack(curve), stack(val_curve), train)


def best_setting(run: GridRun, tol: float = 1e-7) -> int:
    """Index of the setting with the lowest mean final val loss (all seeds finite); settings
    within ``tol`` of the lowest tie, and a tie goes to the smallest learning rate."""
    return _lowest_mean(run.settings, run.val, tol)


def _lowest_mean(settings: list[dict[str, float]], val: Tensor, tol: float = 1e-7) -> int:
    """:func:`best_setting`'s rule on an (S, R) val loss."""
    score = val.mean(dim=1)
    score = torch.where(torch.isfinite(val).all(dim=1), score, torch.full_like(score, math.inf))
    best = float(score.min())
    tied = [i for i in range(len(settings)) if float(score[i]) <= best + tol]
    return min(tied, key=lambda i: (settings[i].get("lr", 0.0), i))


@dataclass
class EarlyStop:
    """Each instance stopped at its curve point of lowest val loss (see :func:`early_stopped`).

    Attributes:
        setting: index of the setting chosen on the mean early-stopped val loss.
        val, test: (R,) the chosen setting's val / test loss at each seed's stop.
        stop_steps: (R,) the step each seed stopped at.
    """

    setting: int
    val: Tensor
    test: Tensor
    stop_steps: list[int]


def early_stopped(run: GridRun) -> EarlyStop:
    """Early stopping on val, chosen on val: every (setting, seed) keeps its weights from the
    curve point with the lowest val loss (the earliest on a tie), and the setting with the
    lowest mean val loss there (all seeds finite; a tie to the smaller learning rate, as in
    :func:`best_setting`) is chosen. Needs a run with ``curve_points``."""
    if run.val_curve.shape[-1] == 0:
        raise ValueError("early stopping needs the val curve: run_grid(..., curve_points=C > 0)")
    stop = torch.argmin(run.val_curve, dim=-1)  # (S, R); argmin returns the first minimum
    val = torch.gather(run.val_curve, -1, stop.unsqueeze(-1)).squeeze(-1)
    test = torch.gather(run.curve, -1, stop.unsqueeze(-1)).squeeze(-1)
    b = _lowest_mean(run.settings, val)
    return EarlyStop(b, val[b], test[b], [run.curve_steps[int(i)] for i in stop[b]])
