"""The self-referential network as a method: a learned modifier trains the task once.

``SelfRefMethod`` (name ``"selfref"``) obtains meta-parameters φ for its modifier core and
then trains the task with them in one run that spends the whole budget — as many steps as
``budget.grad_evals`` pays for, not one trial's ``steps_per_trial`` — the way
Andrychowicz et al. 2016 apply a meta-trained optimizer to a new task. The run's length is
the horizon the network's training-progress features are told. φ comes from, in order:

1. ``checkpoint=PATH`` — a meta-training checkpoint (``selfref meta-train``);
2. ``checkpoint="auto"`` (default) — the checkpoint shipped in ``selfref/net/pretrained/``:
   for the default core ``lopt``, ``lopt.pt`` (meta-trained on a task distribution, for any
   task: an ensemble of two ``lopt`` restarts, ``selfref meta-train --preset
   lopt-ensemble``), for other cores ``<core>_<task name>.pt``
   when there is one (``lstm_digits-mlp.pt``, ``python -m experiments.l2l_digits --export``);
3. otherwise (cores other than ``lopt``) a quick meta-training on training instances of the
   same family (other initializations and minibatch orders, or other functions).

Meta-training is charged to ``counter.spend_meta_train`` and reported as
``Result.meta_train_grad_evals`` — for a shipped checkpoint, the cost recorded in it — never
to the budget. The budget pays for the training run: one gradient evaluation per step, and
half of one per held-out (val) minibatch the network measures
(``EvaluationConfig.heldout_every``; a whole one when it also takes the held-out gradient,
``heldout_grad``), rounded up.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch

from selfref import checkpoints
from selfref.budget import Budget, CostCounter, reset_peak_memory
from selfref.logging import Logger, NullLogger
from selfref.methods.base import Result, Tracker
from selfref.params import all_finite
from selfref.tasks import Task

__all__ = ["SelfRefMethod"]

TRACE_POINTS = 200  # the modifier's own metrics are logged this many times along a run


class SelfRefMethod:
    """Train a task with a meta-trained self-modifying network.

    Args:
        core: modifier core name (``"lopt"``, ``"lstm"``, ``"hypernet"``, ``"srwm"``).
        checkpoint: ``"auto"``, a checkpoint path, or None (always meta-train here).
        which: ``"best"`` (φ chosen by held-out loss) or ``"last"`` from a checkpoint.
        meta_steps, meta_batch, unroll, meta_lr, meta_loss: the quick meta-training
            (defaults sized to take seconds, far from the paper's 1000 × 128).
        eval_tasks, eval_every: held-out instances and period for choosing φ.
        curve_points: validation evaluations along the run (for the best-so-far curve).
        packed: run a loaded checkpoint with packed steps (:mod:`selfref.net.packing`;
            the ``lopt`` core and ensembles of it): the same steps to float rounding, about
            twice as fast. None (the default): packed when the checkpoint's core runs packed
            (the shipped one does); False: per tensor, as results before 2026-12-08 ran.

    Example:
        >>> from selfref.budget import Budget
        >>> from selfref.tasks import make
        >>> res = SelfRefMethod().run(make("quadratic"), Budget(20, 20))  # the shipped lopt
        >>> res.grad_evals, res.meta_train_grad_evals > 0
        (20, True)
    """

    name: ClassVar[str] = "selfref"

    def __init__(
        self,
        core: str = "lopt",
        checkpoint: str | Path | None = "auto",
        which: str = "best",
        meta_steps: int = 40,
        meta_batch: int = 16,
        unroll: int = 20,
        meta_lr: float = 1e-2,
        meta_loss: str = "sum",
        eval_tasks: int = 8,
        eval_every: int = 10,
        curve_points: int = 10,
        packed: bool | None = None,
    ) -> None:
        from selfref.net.cores import core_names

        if core not in core_names():
            raise ValueError(f"unknown core {core!r}; valid cores: {', '.join(core_names())}")
        if which not in ("best", "last"):
            raise ValueError(f"which must be 'best' or 'last', got {which!r}")
        if meta_steps < 1 or meta_batch < 1 or unroll < 1 or curve_points < 1:
            raise ValueError(
                "meta_steps, meta_batch, unroll and curve_points must be >= 1, got "
                f"{meta_steps}, {meta_batch}, {unroll}, {curve_points}"
            )
        if packed and core != "lopt":
            raise ValueError(f"packed runs the lopt core (or an ensemble of it), not {core!r}")
        if checkpoint not in (None, "auto") and not Path(str(checkpoint)).is_file():
            raise ValueError(f"checkpoint {str(checkpoint)!r} does not exist")
        self.core = core
        self.checkpoint = checkpoint
        self.which = which
        self.meta_steps = meta_steps
        self.meta_batch = meta_batch
        self.unroll = unroll
        self.meta_lr = meta_lr
        self.meta_loss = meta_loss
        self.eval_tasks = eval_tasks
        self.eval_every = eval_every
        self.curve_points = curve_points
        self.packed = packed

    def _checkpoint_path(self, task: Task) -> Path | None:
        if self.checkpoint is None:
            return None
        if self.checkpoint != "auto":
            return Path(str(self.checkpoint))
        from selfref.net.optimizer import PRETRAINED_DIR, default_checkpoint

        p = (
            default_checkpoint()
            if self.core == "lopt"
            else PRETRAINED_DIR / f"{self.core}_{task.name}.pt"
        )
        return p if p.is_file() else None

    def _meta_params(
        self, task: Task, steps: int, counter: CostCounter, logger: Logger, seed: int
    ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        from selfref.meta import MetaTrainConfig, MetaTrainer, load_checkpoint
        from selfref.net import SelfReferentialNet
        from selfref.net.network import runs_packed

        path = self._checkpoint_path(task)
        if path is not None:
            ck = load_checkpoint(path, map_location=task.device)
            packed = runs_packed(ck["net"]) if self.packed is None else self.packed
            net = SelfReferentialNet.from_description(task, ck["net"], packed=packed)
            phi = checkpoints.meta_params_of(ck, self.which)
            cost = int(checkpoints.grad_evals_of(ck))
            counter.spend_meta_train(cost)
            info = {
                "source": str(path),
                "meta_train_grad_evals": cost,
                "heldout_log10": ck.get("best_score"),
            }
            return net, phi, info
        if self.core == "lopt":
            raise ValueError(
                "no lopt checkpoint to load (selfref/net/pretrained/lopt.pt or checkpoint=PATH);"
                " the lopt core is meta-trained by `selfref meta-train --preset lopt`"
            )
        net = SelfReferentialNet.from_task(task, core=self.core)
        cfg = MetaTrainConfig(
            meta_steps=self.meta_steps,
            unroll=min(self.unroll, steps),
            inner_steps=steps,
            meta_batch=self.meta_batch,
            meta_lr=self.meta_lr,
            meta_loss=self.meta_loss,
            eval_every=self.eval_every,
            eval_tasks=self.eval_tasks,
            eval_split="train",
            checkpoint_every=0,
            seed=seed,
        )
        res = MetaTrainer(net, cfg, logger).train()
        counter.spend_meta_train(int(res.meta_train_grad_evals))
        info = {
            "source": "meta-trained here",
            "meta_train_grad_evals": int(res.meta_train_grad_evals),
            "heldout_log10": res.best_score,
            "best_step": res.best_step,
        }
        return net, res.best_meta_params, info

    def run(
        self, task: Task, budget: Budget, logger: Logger | None = None, seed: int = 0
    ) -> Result:
        """Obtain φ, then train ``task`` once with the whole budget of gradient evaluations."""
        logger = logger or NullLogger()
        reset_peak_memory(task.device)
        counter = CostCounter(budget)
        net, phi, info = self._meta_params(
            task, min(budget.steps_per_trial, budget.grad_evals), counter, logger, seed
        )
        read_cost = net.evaluation.config.heldout_cost
        steps, reads = _plan(budget.grad_evals, net.evaluation.reads_heldout, read_cost)
        phi = {k: v.detach().to(device=task.device, dtype=task.dtype) for k, v in phi.items()}
        # One instance with a leading dimension of 1: ``step_many`` takes ∇θQ by plain reverse
        # mode, cheaper per step than the torch.func.grad inside ``step`` (same numbers).
        params = {
            k: v[None]
            for k, v in task.init_params(torch.Generator().manual_seed(int(seed))).items()
        }
        state = torch.func.vmap(lambda p: net.init_state(phi, p, horizon=steps))(params)
        every = max(1, steps // self.curve_points)
        trace_every = max(1, steps // TRACE_POINTS)
        tracker = Tracker(self.name, task, seed, logger)
        status, reason = "ok", None
        owed = 0.0  # held-out reads not yet charged (charged in whole evaluations)
        with torch.no_grad():
            for t in range(steps):
                counter.spend(1)
                batch: Any = {k: v[None] for k, v in task.batch("train", t, seed).items()}
                if t in reads:
                    batch["heldout"] = {k: v[None] for k, v in task.batch("val", t, seed).items()}
                    owed += read_cost
                if owed >= 1 or (owed and t + 1 == steps):
                    counter.spend(math.ceil(owed))  # e.g. two forward passes (or the last one)
                    owed = 0.0
                params, state, m = net.step_many(phi, params, state, batch)
                loss = float(m["loss"][0])
                logger.scalar("inner/loss", loss, t)
                logger.scalar("modify/update_norm", m["update_norm"][0], t)
                if t % trace_every == 0 or t + 1 == steps:
                    _log_modifier(logger, m, t)
                if not math.isfinite(loss) or not all_finite(params):
                    status, reason = "diverged", f"non-finite loss or weights at step {t}"
                    break
                if (t + 1) % every == 0 or t + 1 == steps:
                    v = task.evaluate({k: x[0] for k, x in params.items()}, "val")["loss"]
                    logger.scalar("val/loss", v, t + 1)
                    tracker.observe(counter.grad_evals, v)
        if owed:  # stopped early with an unpaired held-out read
            counter.spend(math.ceil(owed))
        params = {k: v[0] for k, v in params.items()}
        src = info["source"]
        return tracker.result(
            tracker.evaluate(params) if status == "ok" else None,
            counter,
            meta_weights=src if src != "meta-trained here" else None,
            status=status,  # type: ignore[arg-type]
            reason=reason,
            extra={"core": self.core, "steps": steps, **info},
        )


def _log_modifier(logger: Logger, metrics: dict[str, Any], t: int) -> None:
    """The modifier's own measurements at step t — the core's (``lopt/log_step_mean``, the
    step rule's ``lopt/heldout_step_mean``, ...) under their names, the others (the gradient
    norm, the held-out loss on a read) under ``modify/`` — so a run shows what the learned
    optimizer did beside its loss curves."""
    for k, v in metrics.items():
        if k in ("loss", "update_norm") or not torch.is_tensor(v) or v.numel() != 1:
            continue
        logger.scalar(k if "/" in k else f"modify/{k}", v.reshape(()), t)


def _plan(grad_evals: int, reads_heldout: Any, read_cost: float = 0.5) -> tuple[int, set[int]]:
    """(steps, the steps that read a held-out minibatch): the most steps whose cost — 1
    each, plus ``read_cost`` (1/2, or 1 with the held-out gradient) per held-out read,
    rounded up — fits in ``grad_evals``."""
    steps, reads = 0, 0
    while True:
        r = reads + int(reads_heldout(steps))
        if steps + 1 + math.ceil(r * read_cost) > grad_evals:
            break
        steps, reads = steps + 1, r
    if steps == 0:  # not even one step with its read fits: one step without it
        return 1, set()
    return steps, {t for t in range(steps) if reads_heldout(t)}
