"""Meta-problem: a learned black-box optimizer on functions drawn from a GP prior.

Chen et al. 2017, "Learning to learn without gradient descent by gradient descent" (ICML).
φ are the weights of the LSTM proposer :class:`~selfref.net.blackbox.BlackBoxRNN`; one inner
trajectory is one optimization of one function f, ``x_t = RNN_φ(h_{t−1}, x_{t−1}, y_{t−1})``,
``y_t = f(x_t)`` for t = 1..T (section 2, eq. 1; noise-free observations). The functions are
differentiable, so the meta-loss is differentiated by backpropagation through the whole
trajectory, through the function values and through the RNN's own inputs (the paper's
Figure 1; derivatives of f are used at training time only, never at test time). The
estimator is ``full_bptt`` (the paper's: one truncation of the whole horizon) or ``tbptt``.

What follows the paper, by section:

- **Training functions** (section 2.2): zero-mean GP samples with the RBF kernel (signal
  variance 1), drawn in closed form with random Fourier features
  (:func:`selfref.tasks.blackbox.sample_gp`), one isotropic length scale per function.
  Length scales are given relative to the cube's size, ℓ = s·√d, and s is drawn uniformly
  from ``length_scales`` less the ``heldout`` band, which is kept for testing ("GP samples of
  held-out length scales", section 3.1).
- **Input dimensions** (sections 2 and 3): one network per input dimension d; it reads
  (x_{t−1}, y_{t−1}), d + 1 numbers, and emits x_t ∈ [0, 1]^d. The paper's experiments use
  d up to 6 (Hartmann 6).
- **Horizon** (section 3): trajectories of T queries; the learned optimizer is trained for a
  fixed horizon and is meant to be used up to it ("up to the training horizon", abstract).
  The trainer's ``inner_steps`` is T (the paper's: 100); the shipped checkpoints were
  trained with T = 50 to fit a CPU budget (see :mod:`experiments.chen_blackbox`).
- **Losses** (section 2.1), per trajectory, summed over t = 1..T:
  ``sum``: Σ_t f(x_t) (eq. 2); ``ei``: −Σ_t EI(x_t | y_{1:t−1}), the expected improvement
  under the GP posterior with the kernel the function was drawn from (eq. 3; exact GP
  inference at training time only); ``oi``: the observed improvement
  Σ_t min{f(x_t) − min_{i<t} f(x_i), 0} (eq. 4). For ``ei`` and ``oi`` the t = 1 term, which
  has no earlier observation, is left out.
- **Normalization**: the training functions have the prior's scale (mean 0, variance 1),
  and the RNN reads raw y (``normalization="none"``, the paper's). A test function must then
  be put on that scale by an affine map of its values; :func:`rollout` takes it as
  ``y_shift``/``y_scale`` (for the benchmarks: the function's mean and standard deviation
  over the cube, :func:`selfref.tasks.blackbox.domain_stats`). Beside the paper, as an
  option: ``normalization="online"`` feeds y standardized by the mean and standard
  deviation of the trajectory's observations so far, which makes the optimizer invariant to
  affine changes of f and needs no knowledge of its range (for hyperparameter search).

The held-out evaluation runs φ on ``eval_functions`` fixed validation functions (their own
seeds, length scales from the training distribution, never the held-out band) and scores
the mean best value found within the horizon (lower is better; the functions are the same
at every evaluation, so this orders φ as the mean regret would).

Cost: one query of a training function with its share of the backward pass is counted as one
gradient evaluation — of the synthetic function, not of any task's model (forward half,
backward half, as :class:`~selfref.meta.problems.SequenceProblem` charges).

Notation: n – functions (trajectories), d – input dimension, T – horizon, K – truncation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from selfref.meta.problem import Inner, Truncation, detach_tree
from selfref.net.blackbox import BlackBoxRNN, BlackBoxRNNConfig
from selfref.params import Params
from selfref.tasks.blackbox import expected_improvement, gp_eval, gp_posterior, sample_gp

__all__ = [
    "BlackBoxConfig",
    "BlackBoxProblem",
    "LOSSES",
    "NORMALIZATIONS",
    "EVAL_SEED_BASE",
    "TEST_SEED_BASE",
    "rollout",
    "draw_length_scales",
    "normalize_input",
]

LOSSES = ("oi", "ei", "sum")
NORMALIZATIONS = ("none", "online")
EVAL_SEED_BASE = 2**31  # validation functions: seeds EVAL_SEED_BASE + i
TEST_SEED_BASE = 2**32  # test functions (benchmarks, experiments): TEST_SEED_BASE + i


@dataclass(frozen=True)
class BlackBoxConfig:
    """The meta-problem's settings (Chen et al. 2017 where the paper fixes them)."""

    dim: int = 2  # d, input dimension of the functions (one network per d)
    loss: str = "oi"  # "oi" (eq. 4), "ei" (eq. 3) or "sum" (eq. 2)
    normalization: str = "none"  # "none": raw y as the paper; "online": standardized y
    length_scales: tuple[float, float] = (0.1, 0.5)  # s range, ℓ = s·√d (training)
    heldout: tuple[float, float] = (0.2, 0.3)  # s band never trained on (test functions)
    features: int = 256  # m, random Fourier features per GP sample
    hidden: int = 64  # LSTM hidden units
    layers: int = 2  # LSTM layers
    eval_functions: int = 64  # validation functions of the held-out evaluation
    eval_horizon: int = 100  # queries per validation trajectory

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalization {self.normalization!r}; valid: {', '.join(NORMALIZATIONS)}"
            )
        lo, hi = self.length_scales
        a, b = self.heldout
        if not 0 < lo < hi:
            raise ValueError(f"length_scales must be 0 < low < high, got {self.length_scales}")
        if not a <= b:
            raise ValueError(f"heldout band must be low <= high, got {self.heldout}")
        if a <= lo and b >= hi:
            raise ValueError(f"heldout band {self.heldout} covers all of {self.length_scales}")
        for name in ("dim", "features", "hidden", "layers", "eval_functions", "eval_horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def net_config(self) -> BlackBoxRNNConfig:
        return BlackBoxRNNConfig(dim=self.dim, hidden=self.hidden, layers=self.layers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["length_scales"], d["heldout"] = list(self.length_scales), list(self.heldout)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlackBoxConfig:
        d = dict(d)
        d.pop("kind", None)
        d["length_scales"] = tuple(d["length_scales"])
        d["heldout"] = tuple(d["heldout"])
        return cls(**d)


def draw_length_scales(config: BlackBoxConfig, generator: torch.Generator, n: int) -> Tensor:
    """n length scales ℓ = s·√d, s uniform on ``length_scales`` less the ``heldout`` band."""
    lo, hi = config.length_scales
    a, b = max(config.heldout[0], lo), min(config.heldout[1], hi)
    width = (hi - lo) - max(0.0, b - a)
    u = torch.rand(n, generator=generator, dtype=torch.float64) * width + lo
    if b > a:
        u = torch.where(u >= a, u + (b - a), u)
    return u * math.sqrt(config.dim)


def normalize_input(y: Tensor, Y: Tensor, t: int, mode: str) -> Tensor:
    """The value the RNN reads for y_t = ``y`` (n,), given the observations ``Y[:, :t+1]``.

    ``none``: y itself. ``online``: (y − mean) / std over the observations so far (0 at
    the first query; std floored at 1e-6).
    """
    if mode == "none":
        return y
    if t == 0:
        return torch.zeros_like(y)
    seen = Y[:, : t + 1]  # (n, t + 1)
    mean = seen.mean(dim=1)
    std = seen.std(dim=1, correction=0).clamp_min(1e-6)
    return (y - mean) / std


class BlackBoxProblem:
    """Meta-train an LSTM black-box optimizer on GP samples (Chen et al. 2017).

    Args:
        config: see :class:`BlackBoxConfig`.
        dtype: of φ and the functions (float64 by default: the EI loss's Cholesky factors
            need it).

    Example:
        >>> from selfref.meta import MetaTrainConfig, MetaTrainer
        >>> p = BlackBoxProblem(BlackBoxConfig(dim=2, hidden=8, layers=1, eval_functions=4,
        ...                                    eval_horizon=5))
        >>> cfg = MetaTrainConfig(meta_steps=2, estimator="full_bptt", inner_steps=5,
        ...                       meta_batch=4, eval_every=0)
        >>> res = MetaTrainer(p, cfg).train()
        >>> res.steps_done, res.meta_train_grad_evals
        (2, 40.0)
    """

    name = "blackbox"

    def __init__(self, config: BlackBoxConfig | None = None, dtype: torch.dtype = torch.float64):
        self.config = config or BlackBoxConfig()
        # Named ``proposer``, not ``net``: the trainer reads ``problem.net`` as a
        # SelfReferentialNet (what LearnedOptimizer checkpoints describe).
        self.proposer = BlackBoxRNN(self.config.net_config())
        self.device = torch.device("cpu")
        self.dtype = dtype
        self._eval_fns: dict[str, Tensor] | None = None

    # -- the protocol ----------------------------------------------------------------------

    def init_meta_params(self, generator: torch.Generator) -> Params:
        return self.proposer.init_params(generator, self.dtype)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, **self.config.to_dict()}

    def functions(self, seeds: list[int], length_scales: Tensor) -> dict[str, Tensor]:
        """The GP samples of ``seeds`` (function i drawn from ``Generator(seeds[i])``)."""
        parts = [
            sample_gp(
                torch.Generator().manual_seed(int(s)),
                1,
                self.config.dim,
                length_scales[i : i + 1],
                self.config.features,
                dtype=self.dtype,
            )
            for i, s in enumerate(seeds)
        ]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def init_inner(
        self, meta_params: Params, generator: torch.Generator, n: int, horizon: int, step: int
    ) -> Inner:
        """n fresh GP samples (seeds in [0, 2^30) and length scales from ``generator``)."""
        seeds = torch.randint(0, 2**30, (n,), generator=generator).tolist()
        ls = draw_length_scales(self.config, generator, n)
        return self._start(self.functions(seeds, ls), seeds, horizon)

    def _start(self, fns: dict[str, Tensor], seeds: list[int], horizon: int) -> Inner:
        n, d = len(seeds), self.config.dim
        state = self.proposer.init_state(n, self.dtype)
        data = {
            "fns": fns,
            "h": state["h"],
            "c": state["c"],
            "x_prev": torch.zeros(n, d, dtype=self.dtype),
            "y_prev": torch.zeros(n, dtype=self.dtype),
            "best": torch.full((n,), math.inf, dtype=self.dtype),
            "X": torch.zeros(n, horizon, d, dtype=self.dtype),
            "Y": torch.zeros(n, horizon, dtype=self.dtype),
        }
        return Inner(data, seeds, 0, horizon)

    def _propose(
        self, phi: Params, data: dict[str, Any], per_instance: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        if not per_instance:
            x, st = self.proposer.step(
                phi, {"h": data["h"], "c": data["c"]}, data["x_prev"], data["y_prev"]
            )
            return x, st["h"], st["c"]

        def one(p: Params, h: Tensor, c: Tensor, xp: Tensor, yp: Tensor) -> tuple:
            x, st = self.proposer.step(p, {"h": h[None], "c": c[None]}, xp[None], yp[None])
            return x[0], st["h"][0], st["c"][0]

        return vmap(one)(phi, data["h"], data["c"], data["x_prev"], data["y_prev"])

    def unroll(
        self, meta_params: Params, inner: Inner, length: int, per_instance: bool = False
    ) -> Truncation:
        inner.check_truncation(length)
        cfg = self.config
        data = dict(inner.data)
        fns = data["fns"]
        X, Y, best = data["X"], data["Y"], data["best"]
        terms = []
        for t in range(inner.t, inner.t + length):
            x, data["h"], data["c"] = self._propose(meta_params, data, per_instance)  # (n, d)
            y = gp_eval(fns, x)  # (n,)
            if cfg.loss == "sum":
                terms.append(y)
            elif t > 0 and cfg.loss == "oi":
                terms.append(torch.clamp(y - best, max=0.0))
            elif t > 0:  # ei: the GP posterior of the observations before x_t
                mean, std = gp_posterior(X[:, :t], Y[:, :t], x, fns["ls"], fns["var"])
                terms.append(-expected_improvement(mean, std, best))
            if cfg.loss == "ei":  # only EI reads the earlier queries
                X = torch.cat([X[:, :t], x.unsqueeze(1), X[:, t + 1 :]], dim=1)
            Y = torch.cat([Y[:, :t], y.unsqueeze(1), Y[:, t + 1 :]], dim=1)
            best = torch.minimum(best, y)
            data["x_prev"], data["y_prev"] = x, normalize_input(y, Y, t, cfg.normalization)
        data.update({"X": X, "Y": Y, "best": best})
        n = inner.n
        zero = torch.zeros(n, dtype=self.dtype)
        loss = torch.stack(terms, dim=1).sum(dim=1) if terms else zero + 0 * best.sum()
        return Truncation(
            loss=loss,
            inner=Inner(data, inner.seeds, inner.t + length, inner.horizon),
            grad_evals=0.5 * n * length,
            backward_evals=0.5 * n * length,
            metrics={"inner/best": float(best.detach().mean())},
        )

    def validation_functions(self) -> dict[str, Tensor]:
        """The fixed validation GP samples (seeds EVAL_SEED_BASE + i, training length scales)."""
        if self._eval_fns is None:
            n = self.config.eval_functions
            ls = draw_length_scales(self.config, torch.Generator().manual_seed(EVAL_SEED_BASE), n)
            self._eval_fns = self.functions([EVAL_SEED_BASE + i for i in range(n)], ls)
        return self._eval_fns

    def evaluate(self, meta_params: Params) -> dict[str, float]:
        fns = self.validation_functions()
        n = self.config.eval_functions
        _, Y = rollout(
            self.proposer,
            detach_tree(meta_params),
            lambda x: gp_eval(fns, x),
            n,
            self.config.eval_horizon,
            self.config.normalization,
        )
        best = Y.min(dim=1).values  # (n,)
        score = float(best.mean()) if bool(torch.isfinite(best).all()) else math.inf
        return {
            "score": score,
            "mean_best": score,
            "grad_evals": 0.5 * n * self.config.eval_horizon,
        }


def rollout(
    net: BlackBoxRNN,
    meta_params: Params,
    f: Callable[[Tensor], Tensor],
    n: int,
    steps: int,
    normalization: str = "none",
    y_shift: float | Tensor = 0.0,
    y_scale: float | Tensor = 1.0,
) -> tuple[Tensor, Tensor]:
    """Run the learned optimizer on n black boxes for ``steps`` queries, without gradients.

    Args:
        net, meta_params: the proposer and its φ.
        f: (n, d) queries -> (n,) values (function i is queried at row i).
        n: functions optimized at once.
        steps: T, queries per function.
        normalization: ``"none"`` (the RNN reads (y − y_shift) / y_scale) or ``"online"``.
        y_shift, y_scale: the affine map onto the training prior's scale (``none`` only).

    Returns:
        X (n, T, d) the queries and Y (n, T) the raw values f(x_t).
    """
    d = net.config.dim
    dtype = next(iter(meta_params.values())).dtype
    state = net.init_state(n, dtype)
    x_prev = torch.zeros(n, d, dtype=dtype)
    y_prev = torch.zeros(n, dtype=dtype)
    X = torch.zeros(n, steps, d, dtype=dtype)
    Y = torch.zeros(n, steps, dtype=dtype)
    with torch.no_grad():
        for t in range(steps):
            x, state = net.step(meta_params, state, x_prev, y_prev)
            y = f(x).to(dtype)
            X[:, t], Y[:, t] = x, y
            if normalization == "none":
                y_prev = (y - y_shift) / y_scale
            else:
                y_prev = normalize_input(y, Y, t, normalization)
            x_prev = x
    return X, Y
