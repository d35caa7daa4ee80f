"""The one meta-training loop: a pure init and step over a training state, and one driver.

Shape (google/learned_optimization's outer trainer, torchopt's ``init``/``update``):

- :func:`init_state` — a fresh training state for a :class:`~selfref.meta.problem.MetaProblem`
  and a :class:`~selfref.meta.estimators.GradientEstimator`;
- :func:`train_step` — the state at meta-step s to the state at s + 1: one estimate (on this
  rank's shard of instances, with this rank's random stream), the mean over ranks, the NaN
  guard, global-norm clipping, one Adam step (:class:`selfref.optim.Adam`, functional);
- :class:`MetaTrainer` — the driver around them: held-out evaluation every ``eval_every``
  steps, keep-best (by the problem's held-out ``score``, never the training meta-loss),
  checkpoints and exact resume, logging, a time limit, data-parallel ranks.

With ``ema_decay`` = β > 0 the state also keeps an exponential moving average of φ (the
iterate averaging of Polyak & Juditsky 1992 in its exponential form, as timm's ``ModelEmaV2``
keeps it: φ̄ ← β φ̄ + (1 − β) φ after every update, φ̄ starting at the initial φ; a skipped
step leaves it). Held-out evaluation scores φ̄, keep-best keeps it and
:meth:`MetaTrainer.export` writes it: a meta-gradient's noise moves φ from step to step, and
the average takes the mean of the last ≈ 1 / (1 − β) steps instead of one draw. φ itself, and
so the training trajectory, is the same with or without it. (Selection round 15 found that it
does not narrow the spread between restarts; it is off by default.)

The training state *is* the checkpoint: a dict of tensors, numbers, strings and lists (read
back with ``weights_only=True``; :mod:`selfref.checkpoints`). It holds φ, Adam's moments, the
step, the estimator's state (its inner trajectories), the best φ and score, the evaluation
history and the cost so far. Randomness is counter-based: meta-step s on rank r draws from
``Generator(seed_of(seed, r, s))``, so no generator state needs saving and a resume — also
with several ranks — continues bit for bit.

Defaults of :class:`MetaTrainConfig` follow Andrychowicz et al. 2016, section 3 (Adam 1e-3,
unrolls of 20 over horizons of 100, 128 quadratics per meta-batch). Beside the paper, as
options: a cosine meta-lr schedule with warmup, a horizon curriculum, the log meta-loss,
held-out objectives, and global-norm clipping of the meta-gradient (``clip_grad_norm``, on
by default at 1.0 as a guard rail; neither the paper nor its code clips — 0 turns it off).

Guard rails: a non-finite meta-loss or meta-gradient skips the update (logged as
``meta/skipped``, warned about) and replaces the trajectories; too many skips in a row raise.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch

from selfref import checkpoints
from selfref.logging import Logger
from selfref.meta.estimators import GradientEstimator, estimator_options, make_estimator
from selfref.meta.problem import MetaProblem, detach_tree
from selfref.meta.unroll import META_LOSSES, MODES, OBJECTIVES
from selfref.optim import LR_SCHEDULES, check_lr_schedule, cosine_decay, make_optimizer
from selfref.params import Params
from selfref.runs import RunDir

__all__ = [
    "MetaTrainConfig",
    "MetaTrainer",
    "MetaTrainResult",
    "CHECKPOINT_FORMAT",
    "load_checkpoint",
    "warm_start",
    "init_state",
    "train_step",
    "seed_of",
    "Comm",
    "SingleProcess",
    "LR_SCHEDULES",
]

CHECKPOINT_FORMAT = "selfref-meta/2"

# Options of the estimator that the config names at top level (so the CLI maps onto them).
_ESTIMATOR_FIELDS = ("unroll", "meta_batch")


@dataclass(frozen=True)
class MetaTrainConfig:
    """Every meta-training setting, one place; defaults: Andrychowicz et al. 2016, §3."""

    meta_steps: int = 1000  # meta-gradient updates
    estimator: str = "tbptt"  # see selfref.meta.estimators (tbptt = the paper's)
    estimator_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"sigma": 0.01}
    unroll: int = 20  # K, steps per truncation (estimators that truncate)
    inner_steps: int = 100  # T, horizon: steps per trajectory before it is replaced
    meta_batch: int = 128  # trajectories per estimate (global, split over ranks)
    shards: int = 0  # random streams the meta-batch splits into (0 = one per rank; see shards.py)
    meta_lr: float = 1e-3  # Adam learning rate on φ
    lr_schedule: str = "constant"  # "constant" (paper) or "cosine" decay to min_lr_ratio
    warmup_steps: int = 0  # linear meta-lr warmup (0 = none)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of meta_lr
    clip_grad_norm: float = 1.0  # meta-gradient global-norm clip, a guard rail (0: the paper)
    meta_loss: str = "sum"  # learned optimizers: "sum" Σ Q(θ_t) (paper) or "log_sum"
    objective: str = "train"  # learned optimizers: Q on "train" (paper) or "heldout" batches
    curriculum: tuple[tuple[int, int], ...] = ()  # ((from meta-step, horizon), ...)
    eval_every: int = 50  # held-out evaluation period in meta-steps (0 = only at the end)
    eval_tasks: int = 100  # learned optimizers: held-out instances per evaluation
    eval_split: str = "val"  # learned optimizers: split of the held-out instances
    eval_steps: int = 0  # learned optimizers: held-out horizon (0 = inner_steps)
    checkpoint_every: int = 100  # period of last.pt in meta-steps (0 = only at the end)
    max_consecutive_skips: int = 10  # non-finite meta-losses in a row before giving up
    max_seconds: float = 0.0  # stop after this much training time (0 = no limit)
    log_every: int = 0  # period of the problem's internals (histograms; 0 = never)
    mode: str = "vmap"  # learned optimizers: "vmap" over instances, or a Python "loop"
    ema_decay: float = 0.0  # β of an EMA of φ that evaluation, keep-best and export use (0: off)
    seed: int = 0  # seeds φ's init and every rank's instance stream
    # Fine-tuning: a learned-optimizer checkpoint whose keep-best φ starts the run in place of
    # a fresh draw (its network must have this run's meta-parameter shapes); of an ensemble,
    # member ``init_member``. The starting φ is evaluated at meta-step 0, so keep-best can
    # return it, and its meta-training cost counts in this run's ``grad_evals`` (and its
    # seconds in the exported optimizer's ``wall_s``).
    init_from: str = ""
    init_member: int = -1  # with init_from an ensemble checkpoint: its member (0-based)

    def __post_init__(self) -> None:
        for name in ("meta_steps", "unroll", "inner_steps", "meta_batch", "eval_tasks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "eval_every",
            "checkpoint_every",
            "warmup_steps",
            "eval_steps",
            "log_every",
            "shards",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.shards and self.meta_batch % self.shards:
            raise ValueError(
                f"meta_batch {self.meta_batch} does not split evenly into {self.shards} shards"
            )
        if not self.meta_lr > 0:
            raise ValueError(f"meta_lr must be > 0, got {self.meta_lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_seconds < 0:
            raise ValueError(f"max_seconds must be >= 0, got {self.max_seconds}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.init_member < -1 or (self.init_member >= 0 and not self.init_from):
            raise ValueError(
                f"init_member must be -1 or, with init_from, a member index >= 0; got "
                f"{self.init_member}"
            )
        check_lr_schedule(self.lr_schedule)
        for name, valid in (("meta_loss", META_LOSSES), ("objective", OBJECTIVES), ("mode", MODES)):
            if getattr(self, name) not in valid:
                raise ValueError(
                    f"unknown {name} {getattr(self, name)!r}; valid: {', '.join(valid)}"
                )
        if self.clip_grad_norm < 0:
            raise ValueError(f"clip_grad_norm must be >= 0, got {self.clip_grad_norm}")
        for entry in self.curriculum:
            if len(entry) != 2 or entry[0] < 0 or entry[1] < 1:
                raise ValueError(
                    f"bad curriculum entry {entry!r}; want (from_step >= 0, horizon >= 1)"
                )
        valid_opts = estimator_options(self.estimator)  # raises on an unknown estimator
        bad = sorted(set(self.estimator_options) - set(valid_opts))
        if bad:
            raise ValueError(
                f"estimator {self.estimator!r} has no option {', '.join(bad)}; "
                f"valid: {', '.join(valid_opts)}"
            )
        for name in _ESTIMATOR_FIELDS:
            if name in self.estimator_options:
                raise ValueError(f"set {name} as a config field, not in estimator_options")

    def lr_at(self, step: int, elapsed_s: float = 0.0) -> float:
        """Meta learning rate at meta-step ``step`` (0-based).

        With ``max_seconds``, once the pace so far projects the run past the time limit
        (``elapsed_s`` · meta_steps / step > max_seconds), the cosine schedule's progress is
        the larger of the step's and the elapsed time's fraction, so it anneals by whichever
        budget binds first. While the run is on pace to finish its steps in time, the
        schedule reads the step alone: the clock never enters φ, and a seed reproduces its
        run bit for bit (taking the larger fraction always let wall-clock jitter into the
        first meta-steps' learning rate, where the time's fraction leads the step's).
        """
        lr = self.meta_lr
        if self.warmup_steps and step < self.warmup_steps:
            return lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "cosine":
            span = max(1, self.meta_steps - self.warmup_steps)
            frac = min(1.0, (step - self.warmup_steps) / span)
            if (
                self.max_seconds
                and step > 0
                and elapsed_s * self.meta_steps > (self.max_seconds * step)
            ):  # the time limit is projected to bind
                frac = max(frac, min(1.0, elapsed_s / self.max_seconds))
            return lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine_decay(frac))
        return lr

    def horizon_at(self, step: int) -> int:
        """Inner horizon for trajectories started at meta-step ``step`` (curriculum)."""
        h = self.inner_steps
        for start, horizon in sorted(self.curriculum):
            if step >= start:
                h = horizon
        return h

    def make_estimator(self, world_size: int = 1, rank: int = 0) -> GradientEstimator:
        """The configured estimator for rank ``rank``'s shards of the meta-batch.

        With ``shards`` = k > ``world_size`` the rank runs its k / world_size shards, each on
        its own stream (:class:`~selfref.meta.shards.ShardedEstimator`).
        """
        n_shards = self.shards or world_size
        if n_shards % world_size:
            raise ValueError(f"shards {n_shards} is not a multiple of the world size {world_size}")
        if self.meta_batch % n_shards:
            raise ValueError(
                f"meta_batch {self.meta_batch} does not split evenly over {n_shards} "
                f"{'shards' if self.shards else 'ranks'}"
            )
        valid = estimator_options(self.estimator)
        opts = {k: getattr(self, k) for k in _ESTIMATOR_FIELDS if k in valid}
        if "meta_batch" in opts:
            opts["meta_batch"] = self.meta_batch // n_shards
        base = make_estimator(self.estimator, **opts, **self.estimator_options)
        if n_shards == world_size:  # one shard per rank: the rank's own stream
            return base
        from selfref.meta.shards import ShardedEstimator

        per = n_shards // world_size
        return ShardedEstimator(
            base, range(rank * per, (rank + 1) * per), lambda j, s: seed_of(self.seed, j, s)
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["curriculum"] = [list(x) for x in self.curriculum]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MetaTrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError naming the valid ones."""
        valid = {f.name for f in fields(cls)}
        bad = sorted(set(d) - valid)
        if bad:
            raise ValueError(
                f"unknown meta-training setting(s) {', '.join(bad)}; "
                f"valid: {', '.join(sorted(valid))}"
            )
        d = dict(d)
        d["curriculum"] = tuple(tuple(int(v) for v in x) for x in d.get("curriculum", ()))
        d["estimator_options"] = dict(d.get("estimator_options", {}))
        return cls(**d)


def seed_of(seed: int, rank: int, step: int) -> int:
    """The seed of meta-step ``step`` on rank ``rank`` (a 63-bit hash, counter-based)."""
    h = hashlib.blake2b(f"selfref-meta/{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


class Comm(Protocol):
    """How ranks talk (:class:`SingleProcess`, or torch.distributed in ``distributed.py``)."""

    rank: int
    world_size: int

    def mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The element-wise mean of each tensor over the ranks (the same on every rank)."""
        ...

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0 (None elsewhere)."""
        ...

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        ...


class SingleProcess:
    """The one-rank :class:`Comm`."""

    rank = 0
    world_size = 1

    def mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return tensors

    def gather(self, obj: Any) -> list[Any] | None:
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        return obj


@dataclass
class MetaTrainResult:
    """What :meth:`MetaTrainer.train` returns."""

    meta_params: Params  # φ after the last step
    best_meta_params: Params  # φ with the best held-out score
    best_score: float  # the problem's held-out score of the best φ (lower is better)
    best_step: int
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per evaluation
    skipped: int = 0  # meta-steps skipped for a non-finite meta-loss
    meta_train_grad_evals: float = 0  # gradient evaluations spent meta-training
    steps_done: int = 0  # meta-steps taken (fewer than meta_steps when time ran out)
    wall_s: float = 0.0  # seconds of meta-training


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a meta-training checkpoint (training state or slim export) safely."""
    return checkpoints.load_meta(path, map_location=map_location)


def warm_start(path: str | Path, member: int, like: Params) -> tuple[Params, float, float]:
    """The keep-best φ of the learned-optimizer checkpoint at ``path`` (of an ensemble, its
    member ``member``), checked against a fresh φ ``like`` (the same names and shapes), the
    meta-training gradient evaluations it cost (an ensemble's total shared evenly by its
    members) and the seconds it took (an ensemble member's own clock; for an ensemble that
    did not record its members' clocks, its total shared evenly).

    Raises:
        ValueError: no learned optimizer there, a member index for a single optimizer or
            none (or one out of range) for an ensemble, or a φ that does not fit ``like``
            (the message names the first mismatch).
    """
    ck = load_checkpoint(path)
    net = ck.get("net")
    if not isinstance(net, dict):
        raise ValueError(f"init_from {str(path)!r} holds no learned optimizer")
    phi = checkpoints.meta_params_of(ck, "best")
    cost = float(checkpoints.grad_evals_of(ck))
    wall = float(ck.get("wall_s", 0.0))
    if net.get("core") == "ensemble":
        n = int(net["core_options"]["members"])
        if not 0 <= member < n:
            raise ValueError(
                f"init_from {str(path)!r} is an ensemble of {n}: give init_member in 0..{n - 1}"
            )
        prefix = f"core.m{member}."
        phi = {"core." + k[len(prefix) :]: v for k, v in phi.items() if k.startswith(prefix)}
        cost /= n
        members = ck.get("members") or []
        own = members[member].get("wall_s") if len(members) == n else None  # older: none
        wall = float(own) if own is not None else wall / n
    elif member >= 0:
        raise ValueError(f"init_from {str(path)!r} is one optimizer, not an ensemble: no member")
    missing, extra = sorted(set(like) - set(phi)), sorted(set(phi) - set(like))
    if missing or extra:
        raise ValueError(
            f"init_from {str(path)!r} does not fit this run's network: missing "
            f"{missing or 'none'}, unexpected {extra or 'none'}"
        )
    for k, v in like.items():
        if tuple(phi[k].shape) != tuple(v.shape):
            raise ValueError(
                f"init_from {str(path)!r} does not fit this run's network: {k} has shape "
                f"{tuple(phi[k].shape)}, this run's {tuple(v.shape)}"
            )
    return {k: phi[k].to(dtype=v.dtype, device=v.device) for k, v in like.items()}, cost, wall


# -- the pure core: init and step ---------------------------------------------------------


def init_state(
    problem: MetaProblem,
    estimator: GradientEstimator,
    config: MetaTrainConfig,
    comm: Comm | None = None,
) -> dict[str, Any]:
    """A fresh training state: φ from ``Generator(config.seed)`` (the same on every rank), or
    with ``config.init_from`` the checkpoint's (:func:`warm_start`)."""
    comm = comm or SingleProcess()
    phi = problem.init_meta_params(torch.Generator().manual_seed(config.seed))
    spent = inherited = 0.0
    if config.init_from:
        phi, spent, inherited = warm_start(config.init_from, config.init_member, phi)
    phi = {k: v.detach().clone() for k, v in phi.items()}
    gen = torch.Generator().manual_seed(seed_of(config.seed, comm.rank, -1))
    state = {
        "format": CHECKPOINT_FORMAT,
        "problem": problem.describe(),
        "config": config.to_dict(),
        "world_size": comm.world_size,
        "step": 0,
        "meta_params": phi,
        "opt": make_optimizer("adam").init(phi),
        "estimator": estimator.init(problem, phi, gen, 0),
        "best": {
            "score": math.inf,
            "step": -1,
            "meta_params": {k: v.clone() for k, v in phi.items()},
        },
        "history": [],
        "skipped": 0,
        "consecutive_skips": 0,
        "grad_evals": spent,
        "elapsed_s": 0.0,
    }
    if config.init_from:  # the start's own meta-training seconds, for the export's wall_s
        state["inherited_wall_s"] = inherited
    if config.ema_decay > 0:
        state["ema"] = {k: v.clone() for k, v in phi.items()}
    return state


def _global_norm(grads: Params) -> float:
    return float(torch.nn.utils.get_total_norm([g.double() for g in grads.values()]))


def train_step(
    problem: MetaProblem,
    estimator: GradientEstimator,
    config: MetaTrainConfig,
    state: dict[str, Any],
    comm: Comm | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """One meta-step: the state at step s to the state at s + 1, and what to log.

    The estimate runs on this rank's shard with this rank's stream; the meta-gradient and
    meta-loss are averaged over ranks (so every rank takes the same Adam step and φ stays
    identical everywhere). The input state is not modified.
    """
    comm = comm or SingleProcess()
    s = int(state["step"])
    gen = torch.Generator().manual_seed(seed_of(config.seed, comm.rank, s))
    phi = state["meta_params"]
    est = estimator.estimate(problem, phi, state["estimator"], gen, config.horizon_at(s), s)
    keys = list(phi)
    loss_t = torch.tensor([est.meta_loss], dtype=torch.float64)
    cost_t = torch.tensor([est.grad_evals], dtype=torch.float64)
    names = sorted(est.metrics)  # the same on every rank: logged as the mean over ranks
    metrics_t = torch.tensor([float(est.metrics[k]) for k in names], dtype=torch.float64)
    reduced = comm.mean([est.grads[k] for k in keys] + [loss_t, cost_t, metrics_t])
    grads = dict(zip(keys, reduced[: len(keys)]))
    meta_loss = float(reduced[len(keys)])
    spent = float(reduced[len(keys) + 1]) * comm.world_size
    est_metrics = dict(zip(names, reduced[len(keys) + 2].tolist()))
    new = dict(state)
    new["step"] = s + 1
    new["grad_evals"] = float(state["grad_evals"]) + spent
    lr = config.lr_at(s, float(state.get("elapsed_s", 0.0)))
    metrics: dict[str, float] = {"meta/lr": lr}
    finite = math.isfinite(meta_loss) and all(bool(torch.isfinite(g).all()) for g in grads.values())
    if not finite:
        new["skipped"] = int(state["skipped"]) + 1
        new["consecutive_skips"] = int(state["consecutive_skips"]) + 1
        new["estimator"] = estimator.init(problem, phi, gen, s + 1)  # replace trajectories
        metrics["meta/skipped"] = 1.0
        warnings.warn(
            f"meta-step {s}: non-finite meta-loss {meta_loss} or meta-gradient; update "
            f"skipped, trajectories replaced ({new['skipped']} skipped so far)",
            RuntimeWarning,
            stacklevel=2,
        )
        if new["consecutive_skips"] > config.max_consecutive_skips:
            raise RuntimeError(
                f"{new['consecutive_skips']} consecutive non-finite meta-losses at meta-step "
                f"{s}; lower meta_lr or enable clipping"
            )
        return new, metrics
    gn = _global_norm(grads)
    scale = 1.0
    if config.clip_grad_norm > 0 and gn > config.clip_grad_norm:
        scale = config.clip_grad_norm / gn
    grads = {k: g * scale for k, g in grads.items()}
    with torch.no_grad():
        new_phi, new["opt"] = make_optimizer("adam").update(phi, grads, state["opt"], {"lr": lr})
    new["meta_params"] = {k: v.detach() for k, v in new_phi.items()}
    if config.ema_decay > 0:
        b = config.ema_decay
        new["ema"] = {k: b * v + (1 - b) * new["meta_params"][k] for k, v in state["ema"].items()}
    new["estimator"] = est.state
    new["consecutive_skips"] = 0
    metrics.update({"meta/loss": meta_loss, "meta/grad_norm": gn, **est_metrics})
    return new, metrics


# -- the driver ---------------------------------------------------------------------------


class MetaTrainer:
    """Meta-trains φ of ``problem`` with ``config``'s estimator: the one driver.

    Args:
        problem: a :class:`~selfref.meta.problem.MetaProblem`, or a
            :class:`~selfref.net.SelfReferentialNet` (wrapped in a
            :class:`~selfref.meta.problems.LearnedOptimizerProblem` built from ``config``).
        config: see :class:`MetaTrainConfig`.
        logger: where scalars, histograms and text go (never created here); only rank 0
            logs.
        run_dir: when given (rank 0), ``checkpoints/last.pt`` every ``checkpoint_every``
            steps and ``checkpoints/best.pt`` at each held-out improvement.
        baselines: learned optimizers only: {name: (optimizer, hparams)} rolled out once on
            the held-out instances and logged beside the learned curve.
        comm: the ranks (default one process; see :mod:`selfref.meta.distributed`).
        on_eval: called with (step, evaluation) after each held-out evaluation.

    Example:
        >>> from selfref.tasks import make
        >>> from selfref.logging import MemoryLogger
        >>> from selfref.net import SelfReferentialNet
        >>> net = SelfReferentialNet.from_task(make("quadratic"))
        >>> cfg = MetaTrainConfig(meta_steps=2, meta_batch=4, unroll=2, inner_steps=4,
        ...                       eval_tasks=4, eval_every=0)
        >>> res = MetaTrainer(net, cfg, MemoryLogger()).train()
        >>> res.best_step
        2
    """

    def __init__(
        self,
        problem: Any,
        config: MetaTrainConfig,
        logger: Logger | None = None,
        run_dir: RunDir | None = None,
        baselines: dict[str, tuple[str, dict[str, float]]] | None = None,
        comm: Comm | None = None,
        on_eval: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        from selfref.meta.problems import LearnedOptimizerProblem
        from selfref.net.network import SelfReferentialNet

        if isinstance(problem, SelfReferentialNet):
            problem = LearnedOptimizerProblem(
                problem,
                meta_loss=config.meta_loss,
                objective=config.objective,
                mode=config.mode,
                eval_tasks=config.eval_tasks,
                eval_steps=config.eval_steps or config.inner_steps,
                eval_split=config.eval_split,
            )
        if not isinstance(problem, MetaProblem):
            raise TypeError(f"{type(problem).__name__} is not a MetaProblem")
        self.problem = problem
        self.config = config
        self.logger = logger
        self.comm = comm or SingleProcess()
        self.run_dir = run_dir if self.comm.rank == 0 else None
        self.baselines = dict(baselines or {})
        self.on_eval = on_eval
        self.estimator = config.make_estimator(self.comm.world_size, self.comm.rank)
        self.state = init_state(problem, self.estimator, config, self.comm)

    # -- convenience views of the state ----------------------------------------------------

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def meta_params(self) -> Params:
        return self.state["meta_params"]

    @property
    def evaluated_params(self) -> Params:
        """What held-out evaluation scores and keep-best keeps: the EMA of φ with
        ``ema_decay``, else φ."""
        return self.state.get("ema", self.state["meta_params"])

    @property
    def net(self) -> Any:
        return getattr(self.problem, "net", None)

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The training state (every rank's estimator state, gathered, under ``estimators``)."""
        out = dict(self.state)
        out["estimators"] = self.comm.gather(self.state["estimator"])
        out.pop("estimator")
        net = self.net
        if net is not None:  # what LearnedOptimizer and the selfref method read
            out["net"] = net.describe()
            out["task"] = net.normal.task.name
        return out

    def load_state_dict(self, ck: dict[str, Any]) -> None:
        if ck.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"not a resumable meta-training state (format {ck.get('format')!r}; "
                f"want {CHECKPOINT_FORMAT})"
            )
        if ck.get("slim"):
            raise ValueError("an exported (slim) checkpoint holds no training state to resume")
        if ck["problem"] != self.problem.describe():
            raise ValueError(
                f"checkpoint problem {ck['problem']} differs from {self.problem.describe()}"
            )
        if int(ck.get("world_size", 1)) != self.comm.world_size:
            raise ValueError(
                f"checkpoint was written by {ck.get('world_size')} ranks; resume it with the "
                f"same number (this run has {self.comm.world_size})"
            )
        state = {k: v for k, v in ck.items() if k not in ("estimators", "net", "task")}
        state["estimator"] = ck["estimators"][self.comm.rank]
        state["config"] = self.config.to_dict()
        if self.config.ema_decay > 0 and "ema" not in state:
            raise ValueError(
                "the checkpoint keeps no EMA of φ: resume it with ema_decay = 0, as it was "
                "written, or start a fresh run"
            )
        if self.config.ema_decay == 0:
            state.pop("ema", None)
        self.state = state

    def save(self, name: str = "last.pt", path: str | Path | None = None) -> Path | None:
        """Write the training state to ``path`` or ``run_dir/checkpoints/<name>`` (rank 0)."""
        sd = self.state_dict()  # every rank takes part in the gather
        if self.comm.rank != 0:
            return None
        if path is not None:
            return checkpoints.save(sd, path)
        if self.run_dir is None:
            raise ValueError("no run_dir and no path: nowhere to save a checkpoint")
        return self.run_dir.save_checkpoint(sd, name)

    def export(self, path: str | Path) -> Path:
        """Write a slim checkpoint (the best φ, no optimizer or carry): what
        :class:`~selfref.net.optimizer.LearnedOptimizer` and the ``selfref`` method load."""
        best = {k: v.detach().clone() for k, v in self.state["best"]["meta_params"].items()}
        slim: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "problem": self.problem.describe(),
            "config": self.config.to_dict(),
            "meta_params": best,
            "best_meta_params": best,
            "best_score": float(self.state["best"]["score"]),
            "best_step": int(self.state["best"]["step"]),
            "grad_evals": float(self.state["grad_evals"]),
            "history": list(self.state["history"]),
            # meta-training, all sessions; fine-tuned, with the start's own (inherited_wall_s)
            "wall_s": float(self.state.get("elapsed_s", 0.0))
            + float(self.state.get("inherited_wall_s", 0.0)),
            "slim": True,
        }
        if "inherited_wall_s" in self.state:
            slim["inherited_wall_s"] = float(self.state["inherited_wall_s"])
        if self.net is not None:
            slim["net"] = self.net.describe()
            slim["task"] = self.net.normal.task.name
        return checkpoints.save(slim, path)

    def resume(self, path: str | Path) -> None:
        """Load a state written by :meth:`save` and continue from it."""
        self.load_state_dict(load_checkpoint(path))

    # -- logging ---------------------------------------------------------------------------

    def _log(self, kind: str, *args: Any) -> None:
        if self.logger is not None and self.comm.rank == 0:
            getattr(self.logger, kind)(*args)

    def _log_curves(self, meta_params: Params) -> None:
        """Held-out curves of φ and of each baseline (learned optimizers), x = inner step."""
        from selfref.meta.evaluate import rollout_baseline

        rollout = getattr(self.problem, "rollout", None)
        if rollout is None or not self.baselines:
            return
        p: Any = self.problem  # a LearnedOptimizerProblem (it has a rollout)
        curves = {"learned": rollout(meta_params).curve}
        for name, (opt, hp) in self.baselines.items():
            curves[name] = rollout_baseline(
                p.family,
                opt,
                hp,
                p.eval_seeds,
                p.eval_steps,
                p.eval_split,  # type: ignore[attr-defined]
            ).curve
        for name, curve in curves.items():
            for t, v in enumerate(curve.tolist()):
                self._log("scalar", f"curve/{name}", math.log10(max(v, 1e-30)), t)

    # -- evaluation and keep-best ----------------------------------------------------------

    def evaluate(self, meta_params: Params | None = None) -> dict[str, float]:
        """The problem's held-out evaluation of φ (default: :attr:`evaluated_params`); rank
        0's is broadcast so every rank keeps the same best."""
        ev = None
        if self.comm.rank == 0:
            ev = self.problem.evaluate(meta_params or self.evaluated_params)
        ev = self.comm.broadcast(ev)
        self.state["grad_evals"] = float(self.state["grad_evals"]) + float(ev.get("grad_evals", 0))
        return ev

    def _evaluate_and_keep(self) -> None:
        ev = self.evaluate()
        s = self.step
        for k, v in ev.items():
            if k != "grad_evals":
                self._log("scalar", f"heldout/{k}", v, s)
        self.state["history"] = [*self.state["history"], {"step": s, **ev}]
        best = self.state["best"]
        if ev["score"] < best["score"] or best["step"] < 0:
            self.state["best"] = {
                "score": float(ev["score"]),
                "step": s,
                "meta_params": {k: v.clone() for k, v in self.evaluated_params.items()},
            }
            self._log("scalar", "heldout/best_score", ev["score"], s)
            self._save_if_run("best.pt")
        if self.on_eval is not None:
            self.on_eval(s, ev)

    def _save_if_run(self, name: str) -> None:
        """Save when there is a run directory (every rank joins the gather; rank 0 writes)."""
        if self.comm.world_size > 1 or self.run_dir is not None:
            sd = self.state_dict()
            if self.run_dir is not None:
                self.run_dir.save_checkpoint(sd, name)

    # -- training --------------------------------------------------------------------------

    def train(self, until: int | None = None) -> MetaTrainResult:
        """Run from the current step to ``config.meta_steps`` (or the time limit).

        Args:
            until: stop after this meta-step instead, as an interrupted run would (no
                closing evaluation; ``last.pt`` is written when there is a run directory),
                so a later :meth:`resume` continues exactly where it stopped.
        """
        cfg = self.config
        end = cfg.meta_steps if until is None else min(until, cfg.meta_steps)
        if self.step == 0:
            self._log(
                "text",
                "config",
                "```\n"
                + json.dumps(
                    {"meta": cfg.to_dict(), "problem": self.problem.describe()},
                    indent=2,
                    default=str,
                )
                + "\n```",
                0,
            )
        if self.step == 0 and cfg.init_from and cfg.eval_every and not self.state["history"]:
            self._evaluate_and_keep()  # the starting φ: keep-best may return it
        t0 = time.perf_counter() - float(self.state.get("elapsed_s", 0.0))
        while self.step < end:
            if cfg.max_seconds:  # rank 0's clock: every rank anneals and stops at the same step
                self.state["elapsed_s"] = self.comm.broadcast(time.perf_counter() - t0)
                if self.state["elapsed_s"] > cfg.max_seconds:
                    break
            s = self.step
            self.state, metrics = train_step(
                self.problem, self.estimator, cfg, self.state, self.comm
            )
            self.state["elapsed_s"] = time.perf_counter() - t0
            for k, v in metrics.items():
                self._log("scalar", k, v, s)
            internals = getattr(self.problem, "log_internals", None)
            if cfg.log_every and s % cfg.log_every == 0 and internals is not None:
                if self.logger is not None and self.comm.rank == 0:
                    internals(self.meta_params, self.logger, s)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.meta_steps:
                self._evaluate_and_keep()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self._save_if_run("last.pt")
        if end < cfg.meta_steps:  # stopped on request: as an interrupted run
            self._save_if_run("last.pt")
            return self.result()
        if self.state["best"]["step"] != self.step:
            self._evaluate_and_keep()
        self._save_if_run("last.pt")
        if self.comm.rank == 0:
            self._log_curves(self.state["best"]["meta_params"])
        if self.logger is not None and self.comm.rank == 0:
            self.logger.flush()
        return self.result()

    def result(self) -> MetaTrainResult:
        st = self.state
        return MetaTrainResult(
            meta_params=detach_tree(st["meta_params"]),
            best_meta_params=st["best"]["meta_params"],
            best_score=float(st["best"]["score"]),
            best_step=int(st["best"]["step"]),
            history=list(st["history"]),
            skipped=int(st["skipped"]),
            meta_train_grad_evals=float(st["grad_evals"]),
            steps_done=int(st["step"]),
            wall_s=float(st.get("elapsed_s", 0.0)),
        )
