"""The meta-trainer: Adam on φ over truncated-BPTT estimates, with guard rails,
held-out evaluation, checkpoints and exact resume.

Andrychowicz et al. 2016, section 3: the LSTM optimizer is trained with Adam (lr 1e-3) on
meta-gradients from unrolls of 20 steps over trajectories of 100 steps, 128 quadratics per
meta-batch. Those are the defaults of :class:`MetaTrainConfig`; the options beside them — a
cosine meta-lr schedule with warmup, a curriculum over horizons, the log meta-loss — are the
"recipe" knobs, off by default.

Guard rails (on by default): the meta-gradient's global norm is clipped; a non-finite
meta-loss or meta-gradient skips the update, is logged (``meta/skipped``) and warned about,
and the broken trajectories are replaced; too many skips in a row raise.

The kept "best" meta-parameters are chosen by the held-out final loss (mean log10 Q(θ_T)
over ``eval_tasks`` held-out instances), never by the training meta-loss.

A checkpoint holds φ, the Adam state, the generator state, the step, the inner carry, the
best-so-far and the evaluation history, so ``resume`` continues bit for bit.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from selfref import checkpoints
from selfref.logging import Logger
from selfref.meta.estimators import InnerState, TruncatedBPTT, detach_tree
from selfref.meta.evaluate import rollout_baseline, rollout_learned
from selfref.meta.family import TaskFamily
from selfref.meta.unroll import META_LOSSES, MODES
from selfref.net.network import SelfReferentialNet
from selfref.optim import LR_SCHEDULES, check_lr_schedule, cosine_decay
from selfref.params import Params
from selfref.runs import RunDir, atomic_torch_save

__all__ = [
    "MetaTrainConfig",
    "MetaTrainer",
    "MetaTrainResult",
    "CHECKPOINT_FORMAT",
    "load_checkpoint",
    "LR_SCHEDULES",
]

CHECKPOINT_FORMAT = "selfref-meta/1"


@dataclass(frozen=True)
class MetaTrainConfig:
    """Meta-training settings; defaults follow Andrychowicz et al. 2016 (quadratics)."""

    meta_steps: int = 1000  # meta-gradient updates (one per truncation)
    unroll: int = 20  # T, steps per truncation
    inner_steps: int = 100  # horizon: steps per task instance before it is replaced
    meta_batch: int = 128  # m, task instances per meta-batch
    meta_lr: float = 1e-3  # Adam learning rate on φ
    lr_schedule: str = "constant"  # "constant" (paper) or "cosine" decay to min_lr_ratio
    warmup_steps: int = 0  # linear meta-lr warmup (0 = none)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of meta_lr
    clip_grad_norm: float = 1.0  # global meta-gradient norm clip (0 disables)
    meta_loss: str = "sum"  # "sum" Σ Q(θ_t) (paper) or "log_sum" Σ log Q(θ_t)
    curriculum: tuple[tuple[int, int], ...] = ()  # ((from meta-step, horizon), ...)
    eval_every: int = 50  # held-out evaluation period in meta-steps (0 = only at the end)
    eval_tasks: int = 100  # held-out instances per evaluation
    eval_split: str = "val"  # split of the held-out instances
    eval_steps: int = 0  # horizon of held-out rollouts (0 = inner_steps)
    checkpoint_every: int = 100  # period of last.pt in meta-steps (0 = only at the end)
    max_consecutive_skips: int = 10  # non-finite meta-losses in a row before giving up
    mode: str = "vmap"  # "vmap" over instances, or a Python "loop"
    seed: int = 0  # seeds φ's init and the instance stream

    def __post_init__(self) -> None:
        for name in ("meta_steps", "unroll", "inner_steps", "meta_batch", "eval_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "warmup_steps", "eval_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.meta_lr > 0:
            raise ValueError(f"meta_lr must be > 0, got {self.meta_lr}")
        check_lr_schedule(self.lr_schedule)
        if self.meta_loss not in META_LOSSES:
            raise ValueError(
                f"unknown meta_loss {self.meta_loss!r}; valid: {', '.join(META_LOSSES)}"
            )
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.clip_grad_norm < 0:
            raise ValueError(f"clip_grad_norm must be >= 0, got {self.clip_grad_norm}")
        for start, horizon in self.curriculum:
            if start < 0 or horizon < 1:
                raise ValueError(f"bad curriculum entry ({start}, {horizon})")

    def lr_at(self, step: int) -> float:
        """Meta learning rate at meta-step ``step`` (0-based)."""
        lr = self.meta_lr
        if self.warmup_steps and step < self.warmup_steps:
            return lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "cosine":
            span = max(1, self.meta_steps - self.warmup_steps)
            frac = min(1.0, (step - self.warmup_steps) / span)
            return lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine_decay(frac))
        return lr

    def horizon_at(self, step: int) -> int:
        """Inner horizon for trajectories started at meta-step ``step`` (curriculum)."""
        h = self.inner_steps
        for start, horizon in sorted(self.curriculum):
            if step >= start:
                h = horizon
        return h

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MetaTrainConfig:
        d = dict(d)
        d["curriculum"] = tuple(tuple(x) for x in d.get("curriculum", ()))
        return cls(**d)


@dataclass
class MetaTrainResult:
    """What :meth:`MetaTrainer.train` returns."""

    meta_params: Params  # φ after the last step
    best_meta_params: Params  # φ with the best held-out score
    best_score: float  # mean log10 held-out final loss of the best φ
    best_step: int
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per evaluation
    skipped: int = 0  # meta-steps skipped for a non-finite meta-loss
    meta_train_grad_evals: int = 0  # inner gradient evaluations spent meta-training


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a meta-training checkpoint and check its format."""
    return checkpoints.load(path, map_location=map_location, formats=CHECKPOINT_FORMAT)


class MetaTrainer:
    """Trains φ of a :class:`SelfReferentialNet` on instances of one task family.

    Args:
        net: the network (its normal model is the task).
        config: see :class:`MetaTrainConfig`.
        logger: where scalars, histograms and text go (never created here).
        run_dir: when given, ``checkpoints/last.pt`` every ``checkpoint_every`` steps and
            ``checkpoints/best.pt`` at each held-out improvement.
        baselines: {name: (optimizer, hparams)} rolled out once on the held-out instances and
            logged beside the learned optimizer's curve.

    Example:
        >>> from selfref.tasks import make
        >>> from selfref.logging import MemoryLogger
        >>> net = SelfReferentialNet.from_task(make("quadratic"))
        >>> cfg = MetaTrainConfig(meta_steps=2, meta_batch=4, unroll=2, inner_steps=4,
        ...                       eval_tasks=4, eval_every=0)
        >>> res = MetaTrainer(net, cfg, MemoryLogger()).train()
        >>> res.best_step
        2
    """

    def __init__(
        self,
        net: SelfReferentialNet,
        config: MetaTrainConfig,
        logger: Logger,
        run_dir: RunDir | None = None,
        baselines: dict[str, tuple[str, dict[str, float]]] | None = None,
    ) -> None:
        self.net = net
        self.config = config
        self.logger = logger
        self.run_dir = run_dir
        self.baselines = dict(baselines or {})
        self.family = TaskFamily(net.normal.task)
        self.estimator = TruncatedBPTT(
            net,
            self.family,
            config.unroll,
            config.meta_batch,
            "train",
            config.meta_loss,
            config.mode,
        )
        # Held-out instance seeds lie above the training stream's range [0, 2^30).
        self.eval_seeds = [2**31 + i for i in range(config.eval_tasks)]
        self._init_fresh()

    # -- state -----------------------------------------------------------------------------

    def _init_fresh(self) -> None:
        cfg = self.config
        self.generator = torch.Generator().manual_seed(cfg.seed)
        device = self.net.normal.task.device
        dtype = self.net.normal.task.dtype
        phi = self.net.init_meta_params(self.generator)
        self.meta_params: Params = {
            k: v.to(device=device, dtype=dtype).requires_grad_(True) for k, v in phi.items()
        }
        self.opt = torch.optim.Adam(list(self.meta_params.values()), lr=cfg.meta_lr)
        self.step = 0
        self.inner: InnerState | None = None
        self.best_score = math.inf
        self.best_step = -1
        self.best_meta_params: Params = detach_tree(self.meta_params)
        self.history: list[dict[str, float]] = []
        self.skipped = 0
        self.consecutive_skips = 0
        self.grad_evals = 0

    def state_dict(self) -> dict[str, Any]:
        """Everything a bit-exact resume needs (plus what LearnedOptimizer reads)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "net": self.net.describe(),
            "task": self.net.normal.task.name,
            "config": asdict(self.config),
            "meta_params": detach_tree(self.meta_params),
            "optimizer": self.opt.state_dict(),
            "rng": self.generator.get_state(),
            "step": self.step,
            "inner": None if self.inner is None else self.inner.to_dict(),
            "best_score": self.best_score,
            "best_step": self.best_step,
            "best_meta_params": self.best_meta_params,
            "history": self.history,
            "skipped": self.skipped,
            "consecutive_skips": self.consecutive_skips,
            "grad_evals": self.grad_evals,
        }

    def load_state_dict(self, ck: dict[str, Any]) -> None:
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a selfref meta-training checkpoint")
        if ck.get("slim"):
            raise ValueError("an exported (slim) checkpoint holds no training state to resume")
        if ck["net"] != self.net.describe():
            raise ValueError(f"checkpoint network {ck['net']} differs from {self.net.describe()}")
        with torch.no_grad():
            for k, v in self.meta_params.items():
                v.copy_(ck["meta_params"][k])
        self.opt.load_state_dict(ck["optimizer"])
        self.generator.set_state(ck["rng"])
        self.step = int(ck["step"])
        self.inner = None if ck["inner"] is None else InnerState.from_dict(ck["inner"])
        self.best_score = float(ck["best_score"])
        self.best_step = int(ck["best_step"])
        self.best_meta_params = ck["best_meta_params"]
        self.history = list(ck["history"])
        self.skipped = int(ck["skipped"])
        self.consecutive_skips = int(ck["consecutive_skips"])
        self.grad_evals = int(ck["grad_evals"])

    def save(self, name: str = "last.pt", path: str | Path | None = None) -> Path:
        """Write the full state to ``path`` or ``run_dir/checkpoints/<name>``."""
        if path is not None:
            atomic_torch_save(self.state_dict(), path)
            return Path(path)
        if self.run_dir is None:
            raise ValueError("no run_dir and no path: nowhere to save a checkpoint")
        return self.run_dir.save_checkpoint(self.state_dict(), name)

    def export(self, path: str | Path) -> Path:
        """Write a slim checkpoint (φ chosen by held-out loss, no optimizer or carry).

        It is what :class:`~selfref.net.optimizer.LearnedOptimizer` and the ``selfref``
        method load; it cannot be resumed from.
        """
        best = {k: v.detach().clone() for k, v in self.best_meta_params.items()}
        slim = {
            "format": CHECKPOINT_FORMAT,
            "net": self.net.describe(),
            "task": self.net.normal.task.name,
            "config": asdict(self.config),
            "meta_params": best,
            "best_meta_params": best,
            "best_score": self.best_score,
            "best_step": self.best_step,
            "grad_evals": self.grad_evals,
            "history": self.history,
            "slim": True,
        }
        atomic_torch_save(slim, path)
        return Path(path)

    def resume(self, path: str | Path) -> None:
        """Load a checkpoint written by :meth:`save` and continue from it."""
        self.load_state_dict(load_checkpoint(path))

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self, meta_params: Params | None = None) -> dict[str, Any]:
        """Held-out rollout of φ: mean log10 final loss, mean final loss, curve."""
        cfg = self.config
        steps = cfg.eval_steps or cfg.inner_steps
        r = rollout_learned(
            self.net,
            meta_params or self.meta_params,
            self.family,
            self.eval_seeds,
            steps,
            cfg.eval_split,
        )
        self.grad_evals += len(self.eval_seeds) * steps
        score = r.final_log10 if not r.diverged else math.inf
        return {"final_log10_loss": score, "final_loss": float(r.final.mean()), "rollout": r}

    def _log_eval(self, ev: dict[str, Any]) -> None:
        s = self.step
        self.logger.scalar("heldout/final_log10_loss", ev["final_log10_loss"], s)
        self.logger.scalar("heldout/final_loss", ev["final_loss"], s)
        self.logger.histogram("modify/update_norm_per_step", ev["rollout"].update_norm, s)

    def _log_curves(self, meta_params: Params, tag: str) -> None:
        """Held-out curves of φ and of each baseline, x = inner step."""
        cfg = self.config
        steps = cfg.eval_steps or cfg.inner_steps
        curves = {
            tag: rollout_learned(
                self.net, meta_params, self.family, self.eval_seeds, steps, cfg.eval_split
            ).curve
        }
        for name, (opt, hp) in self.baselines.items():
            curves[name] = rollout_baseline(
                self.family, opt, hp, self.eval_seeds, steps, cfg.eval_split
            ).curve
        for name, curve in curves.items():
            for t, v in enumerate(curve.tolist()):
                self.logger.scalar(f"curve/{name}", math.log10(max(v, 1e-30)), t)

    # -- training --------------------------------------------------------------------------

    def _finite(self, loss: float, grads: Params) -> bool:
        return math.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads.values())

    def train(self) -> MetaTrainResult:
        """Run from the current step to ``config.meta_steps``; returns the result."""
        cfg = self.config
        if self.step == 0:
            self.logger.text(
                "config",
                "```\n"
                + json.dumps(
                    {"meta": asdict(cfg), "net": self.net.describe()}, indent=2, default=str
                )
                + "\n```",
                0,
            )
        while self.step < cfg.meta_steps:
            lr = cfg.lr_at(self.step)
            for group in self.opt.param_groups:
                group["lr"] = lr
            est = self.estimator.estimate(
                self.meta_params, self.inner, self.generator, cfg.horizon_at(self.step)
            )
            self.grad_evals += est.grad_evals
            s = self.step
            if not self._finite(est.meta_loss, est.grads):
                self.skipped += 1
                self.consecutive_skips += 1
                self.logger.scalar("meta/skipped", 1, s)
                warnings.warn(
                    f"meta-step {s}: non-finite meta-loss {est.meta_loss} or meta-gradient; "
                    f"update skipped, trajectories replaced ({self.skipped} skipped so far)",
                    RuntimeWarning,
                    stacklevel=2,
                )
                if self.consecutive_skips > cfg.max_consecutive_skips:
                    raise RuntimeError(
                        f"{self.consecutive_skips} consecutive non-finite meta-losses at "
                        f"meta-step {s}; lower meta_lr or enable clipping"
                    )
                self.inner = None
            else:
                self.consecutive_skips = 0
                gn = torch.sqrt(sum((g.double() ** 2).sum() for g in est.grads.values()))  # type: ignore[arg-type]
                scale = 1.0
                if cfg.clip_grad_norm > 0 and float(gn) > cfg.clip_grad_norm:
                    scale = cfg.clip_grad_norm / float(gn)
                for k, p in self.meta_params.items():
                    p.grad = est.grads[k] * scale
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                self.inner = est.inner
                self.logger.scalar("meta/loss", est.meta_loss, s)
                self.logger.scalar("meta/grad_norm", float(gn), s)
                self.logger.scalar("meta/lr", lr, s)
                for k, v in est.metrics.items():
                    self.logger.scalar(k, v, s)
                if est.update_norm is not None:
                    self.logger.scalar("modify/update_norm", float(est.update_norm.mean()), s)
            self.step += 1
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.meta_steps:
                self._evaluate_and_keep()
            if (
                self.run_dir is not None
                and cfg.checkpoint_every
                and self.step % cfg.checkpoint_every == 0
            ):
                self.save("last.pt")
        if self.best_step != self.step:
            self._evaluate_and_keep()
        if self.run_dir is not None:
            self.save("last.pt")
        if self.baselines:
            self._log_curves(self.best_meta_params, "learned")
        self.logger.flush()
        return MetaTrainResult(
            meta_params=detach_tree(self.meta_params),
            best_meta_params=self.best_meta_params,
            best_score=self.best_score,
            best_step=self.best_step,
            history=list(self.history),
            skipped=self.skipped,
            meta_train_grad_evals=self.grad_evals,
        )

    def _evaluate_and_keep(self) -> None:
        ev = self.evaluate()
        self._log_eval(ev)
        self.history.append(
            {
                "step": self.step,
                "final_log10_loss": ev["final_log10_loss"],
                "final_loss": ev["final_loss"],
            }
        )
        if ev["final_log10_loss"] < self.best_score or self.best_step < 0:
            self.best_score = ev["final_log10_loss"]
            self.best_step = self.step
            self.best_meta_params = detach_tree(self.meta_params)
            self.best_meta_params = {k: v.clone() for k, v in self.best_meta_params.items()}
            if self.run_dir is not None:
                self.save("best.pt")
            self.logger.scalar("heldout/best_final_log10_loss", self.best_score, self.step)
