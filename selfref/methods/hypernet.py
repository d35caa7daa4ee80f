"""Hyper-training: stochastic hyperparameter optimization through hypernetworks.

Lorraine & Duvenaud 2018, "Stochastic Hyperparameter Optimization through Hypernetworks".
A hypernetwork w_φ(λ) maps the log L2 weight(s) λ to the weights of the task's model. It is
fit to the best-response

    φ* = argmin_φ E_{λ∼p(λ)} [ L_train(w_φ(λ)) + Σ_j exp(λ_j)·‖w_φ(λ)_j‖² ]

and λ is then moved by gradient steps on L_val(w_φ(λ)) through the hypernetwork:

- *global* (Algorithm 1): fit φ under a fixed p(λ) (uniform on the log-range), then take
  λ steps on validation batches with φ frozen;
- *local* (Algorithm 2): each step samples λ ∼ N(λ̂, σ²), takes one φ step on a training
  batch at that λ, then one λ̂ step on a validation batch.

Hypernetwork families (:class:`LinearHypernet`, :class:`MLPHypernet`): linear in λ, and a
small MLP. Scopes of λ: one L2 weight (``single``), one per layer (``layer``), or one per
output class (``class``: λ_c weights row c of the last layer; earlier layers, if any, share
one extra λ). Both families and all scopes work with ``digits-logreg`` and ``digits-mlp``.

Cost (the project's unit, one gradient evaluation): every φ step on a training batch is 1,
every λ step on a validation batch is 1. Full-split evaluations for the best-so-far curve and
the final metrics are forward-only and not charged, as for the search baselines.

Notation: m – number of λs, h – hypernetwork hidden units, b – batch, S – a parameter shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import torch
from einops import einsum
from torch import Tensor

from selfref.budget import Budget, CostCounter, reset_peak_memory
from selfref.logging import Logger
from selfref.methods.base import Result, Tracker
from selfref.optim import make_optimizer
from selfref.params import Params, all_finite, tree_detach
from selfref.tasks import Task

__all__ = [
    "HypernetConfig",
    "HypernetHPO",
    "HyperFit",
    "LinearHypernet",
    "MLPHypernet",
    "L2Scope",
    "make_hypernet",
    "best_response_val_loss",
    "VARIANTS",
    "FAMILIES",
    "SCOPES",
]

VARIANTS = ("global", "local")
FAMILIES = ("linear", "mlp")
SCOPES = ("single", "layer", "class")


def _check_choice(what: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(choices)}")


@dataclass(frozen=True)
class HypernetConfig:
    """Settings of hyper-training (defaults follow Lorraine & Duvenaud 2018, section 4).

    All λ live in natural-log space: the L2 weight of group j is ``exp(λ_j)``.
    """

    variant: str = "local"  # "global" (Algorithm 1) or "local" (Algorithm 2)
    family: str = "linear"  # hypernetwork: "linear" in λ, or a one-hidden-layer "mlp"
    scope: str = "single"  # λ per model: "single", per "layer", or per "class"
    mlp_hidden: int = 50  # hidden units of the MLP hypernetwork
    l2_low: float = 1e-6  # lower end of the L2-weight range (p(λ) for global; input scale)
    l2_high: float = 1.0  # upper end of the L2-weight range
    init_l2: float = 1e-3  # starting λ̂ = log(init_l2) (the log-range's midpoint)
    sigma: float = 0.5  # local: std of λ ∼ N(λ̂, σ²) in log space
    phi_lr: float = 0.01  # Adam step size of φ (the paper trains both levels with Adam)
    lam_lr: float = 0.03  # Adam step size of λ
    global_phi_frac: float = 0.8  # global: share of the budget spent fitting φ
    warmup_frac: float = 0.0  # local: share of φ-only steps at λ ∼ N(λ̂, σ²) before λ moves
    penalize_biases: bool = False  # include biases in ‖w‖² (weights only by default)
    eval_every: int = 25  # grad evals between full-val evaluations for the curve (not charged)

    def __post_init__(self) -> None:
        _check_choice("variant", self.variant, VARIANTS)
        _check_choice("family", self.family, FAMILIES)
        _check_choice("scope", self.scope, SCOPES)
        if not 0 < self.l2_low < self.l2_high:
            raise ValueError(
                f"need 0 < l2_low < l2_high, got l2_low={self.l2_low}, l2_high={self.l2_high}"
            )
        if not self.init_l2 > 0:
            raise ValueError(f"init_l2 must be > 0, got {self.init_l2}")
        for name in ("sigma", "phi_lr", "lam_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.global_phi_frac < 1:
            raise ValueError(f"global_phi_frac must be in (0, 1), got {self.global_phi_frac}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be >= 1, got {self.mlp_hidden}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")

    @property
    def log_low(self) -> float:
        return math.log(self.l2_low)

    @property
    def log_high(self) -> float:
        return math.log(self.l2_high)


# ---------------------------------------------------------------------------------------------
# λ scopes: which weights each λ_j penalizes


@dataclass(frozen=True)
class L2Scope:
    """Maps a vector λ (m,) to the penalty Σ_j exp(λ_j)·‖w_j‖² over groups of weights.

    Groups hold the ``*.weight`` tensors (and biases with ``penalize_biases``); a model with
    no ``*.weight`` tensor (e.g. the quadratic task's ``theta``) has all its tensors penalized.

    Args:
        kind: "single", "layer" or "class".
        names: parameter names of the task's model (``l{i}.weight``/``l{i}.bias``).
        num_classes: rows of the last layer (for ``class``).
        penalize_biases: whether biases belong to the groups.
    """

    kind: str
    names: tuple[str, ...]
    num_classes: int
    penalize_biases: bool = False

    def __post_init__(self) -> None:
        _check_choice("scope", self.kind, SCOPES)

    @property
    def layers(self) -> list[str]:
        """Layer prefixes (``l0``, ``l1``, …) in parameter order."""
        return list(dict.fromkeys(n.split(".")[0] for n in self.names))

    @property
    def dim(self) -> int:
        """m, the number of λs."""
        if self.kind == "single":
            return 1
        if self.kind == "layer":
            return len(self.layers)
        return self.num_classes + (1 if len(self.layers) > 1 else 0)

    def labels(self) -> list[str]:
        """One name per λ (keys of ``best_hparams``)."""
        if self.kind == "single":
            return ["l2"]
        if self.kind == "layer":
            return [f"l2/{layer}" for layer in self.layers]
        out = [f"l2/class{c}" for c in range(self.num_classes)]
        return out + (["l2/hidden"] if len(self.layers) > 1 else [])

    def hparams(self, lam: Tensor) -> dict[str, float]:
        """{label: l2} in :func:`selfref.train.train`'s convention ``0.5·l2·‖w‖²``: l2 = 2·exp(λ).

        So ``train(task, ..., l2=hparams["l2"])`` minimizes the same objective as w_φ(λ).
        """
        return {k: 2.0 * math.exp(v) for k, v in zip(self.labels(), lam.tolist())}

    def _penalized(self, name: str) -> bool:
        if not any(n.endswith(".weight") for n in self.names):
            return True  # a model without ``*.weight`` tensors (e.g. quadratic): all of it
        return name.endswith(".weight") or self.penalize_biases

    def penalty(self, w: Mapping[str, Tensor], lam: Tensor) -> Tensor:
        """Σ_j exp(λ_j)·‖w_j‖² (a scalar; differentiable in w and λ)."""
        coef = torch.exp(lam)  # (m,)
        last = self.layers[-1]
        total = lam.new_zeros(())
        for name, v in w.items():
            if not self._penalized(name):
                continue
            layer = name.split(".")[0]
            if self.kind == "single":
                total = total + coef[0] * (v**2).sum()
            elif self.kind == "layer":
                total = total + coef[self.layers.index(layer)] * (v**2).sum()
            elif layer == last:  # class: row c of the last layer has its own λ_c
                sq = (v**2).reshape(v.shape[0], -1).sum(-1)  # (c,)
                total = total + (coef[: self.num_classes] * sq).sum()
            else:
                total = total + coef[self.num_classes] * (v**2).sum()
        return total


# ---------------------------------------------------------------------------------------------
# Hypernetwork families (functional: φ is an explicit dict, nothing lives on self but shapes)


@dataclass(frozen=True)
class LinearHypernet:
    """w_φ(λ) = w₀ + Σ_j t_j·W_j with t = (λ − c)/s the normalized log L2 weights.

    φ = {``w0.<name>``: S, ``W.<name>``: (m, *S)}. W starts at zero, w₀ at the task's
    initialization, so hyper-training starts from the same weights as ordinary training.
    """

    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    dim: int
    center: float
    scale: float

    def normalize(self, lam: Tensor) -> Tensor:
        return (lam - self.center) / self.scale  # (m,)

    def init(self, base: Params, generator: torch.Generator) -> Params:
        phi: Params = {}
        for name, v in base.items():
            phi[f"w0.{name}"] = v.detach().clone()
            phi[f"W.{name}"] = v.new_zeros((self.dim, *v.shape))
        return phi

    def weights(self, phi: Mapping[str, Tensor], lam: Tensor) -> Params:
        t = self.normalize(lam)  # (m,)
        return {
            name: phi[f"w0.{name}"] + einsum(t, phi[f"W.{name}"], "m, m ... -> ...")
            for name, _ in self.shapes
        }


@dataclass(frozen=True)
class MLPHypernet:
    """w_φ(λ) = b + B·tanh(A·t + a), one hidden layer of h units, t the normalized λ.

    φ = {``A``: (h, m), ``a``: (h,), ``B.<name>``: (h, *S), ``b.<name>``: S}. A is drawn
    N(0, 1/m) from the generator, B starts at zero and b at the task's initialization.
    """

    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    dim: int
    center: float
    scale: float
    hidden: int = 50  # hidden units

    def normalize(self, lam: Tensor) -> Tensor:
        return (lam - self.center) / self.scale  # (m,)

    def init(self, base: Params, generator: torch.Generator) -> Params:
        ref = next(iter(base.values()))
        a = torch.randn(self.hidden, self.dim, generator=generator, dtype=ref.dtype)
        phi: Params = {
            "A": (a / math.sqrt(self.dim)).to(ref.device),
            "a": torch.randn(self.hidden, generator=generator, dtype=ref.dtype).to(ref.device),
        }
        for name, v in base.items():
            phi[f"b.{name}"] = v.detach().clone()
            phi[f"B.{name}"] = v.new_zeros((self.hidden, *v.shape))
        return phi

    def weights(self, phi: Mapping[str, Tensor], lam: Tensor) -> Params:
        t = self.normalize(lam)  # (m,)
        h = torch.tanh(phi["A"] @ t + phi["a"])  # (h,)
        return {
            name: phi[f"b.{name}"] + einsum(h, phi[f"B.{name}"], "h, h ... -> ...")
            for name, _ in self.shapes
        }


Hypernet = LinearHypernet | MLPHypernet


def _grad_and_value(fn: Any) -> Any:
    """``fn(x, *rest) -> scalar`` ↦ ``(x, *rest) -> (∂fn/∂x, value)`` for a tensor or dict ``x``.

    Reverse mode on fresh leaf copies of ``x`` (same numbers as ``torch.func.grad_and_value``,
    about half its per-step overhead on these small models); nothing is mutated.
    """

    def wrapped(x: Any, *rest: Any) -> tuple[Any, Tensor]:
        if isinstance(x, Tensor):
            leaf = x.detach().requires_grad_(True)
            value = fn(leaf, *rest)
            (g,) = torch.autograd.grad(value, leaf)
            return g, value.detach()
        leaves = {k: v.detach().requires_grad_(True) for k, v in x.items()}
        value = fn(leaves, *rest)
        grads = torch.autograd.grad(value, list(leaves.values()))
        return dict(zip(leaves, grads)), value.detach()

    return wrapped


def make_hypernet(family: str, base: Params, dim: int, config: HypernetConfig) -> Hypernet:
    """Build a hypernetwork family for weights shaped like ``base`` and m = ``dim`` λs."""
    _check_choice("family", family, FAMILIES)
    shapes = tuple((k, tuple(v.shape)) for k, v in base.items())
    center = 0.5 * (config.log_low + config.log_high)
    scale = 0.5 * (config.log_high - config.log_low)
    if family == "linear":
        return LinearHypernet(shapes, dim, center, scale)
    return MLPHypernet(shapes, dim, center, scale, config.mlp_hidden)


# ---------------------------------------------------------------------------------------------
# The method


@dataclass
class HyperFit:
    """What hyper-training leaves behind: the hypernetwork, φ, the found λ and the Result."""

    hypernet: Hypernet
    scope: L2Scope
    phi: Params
    lam: Tensor  # (m,) log L2 weights chosen (best full-val loss seen)
    result: Result
    history: dict[str, list[float]] = field(default_factory=dict)

    def weights(self, lam: Tensor | float | None = None) -> Params:
        """w_φ(λ) (detached); ``lam`` a scalar broadcasts to every λ_j."""
        if lam is None:
            lam = self.lam
        lam_t = torch.as_tensor(lam, dtype=self.lam.dtype, device=self.lam.device)
        lam_t = lam_t.expand(self.scope.dim) if lam_t.ndim == 0 else lam_t
        with torch.no_grad():
            return tree_detach(self.hypernet.weights(self.phi, lam_t))


class HypernetHPO:
    """Tune L2 weight(s) by hyper-training a hypernetwork (Lorraine & Duvenaud 2018).

    Args:
        config: a :class:`HypernetConfig`; or its fields as keyword arguments.

    Budget use: the global variant spends ``global_phi_frac`` of ``budget.grad_evals`` on φ
    steps and the rest on λ steps; the local variant spends ``warmup_frac`` on φ-only steps
    and alternates one φ step and one λ̂ step (2 gradient evaluations) after that. It never
    spends more than the budget (every step is charged through the CostCounter first).

    Example:
        >>> from selfref.tasks import make
        >>> task = make("digits-logreg")
        >>> res = HypernetHPO(variant="local").run(task, Budget(grad_evals=200), seed=0)
        >>> res.grad_evals <= 200
        True
    """

    name: ClassVar[str] = "hypernet"
    options_class: ClassVar[type] = HypernetConfig  # its fields are the options

    def __init__(self, config: HypernetConfig | None = None, **options: Any) -> None:
        base = config or HypernetConfig()
        self.config = replace(base, **options) if options else base

    def run(
        self, task: Task, budget: Budget, logger: Logger | None = None, seed: int = 0
    ) -> Result:
        return self.fit(task, budget, logger=logger, seed=seed).result

    def fit(
        self, task: Task, budget: Budget, logger: Logger | None = None, seed: int = 0
    ) -> HyperFit:
        """Hyper-train on ``task`` within ``budget``; return φ, λ and the :class:`Result`."""
        cfg = self.config
        counter = CostCounter(budget)
        reset_peak_memory(task.device)
        gen = torch.Generator().manual_seed(seed)
        base = task.init_params(gen)
        num_classes = int(getattr(task, "num_classes", 0))
        scope = L2Scope(cfg.scope, tuple(base), num_classes, cfg.penalize_biases)
        if cfg.scope == "class" and num_classes < 1:
            raise ValueError(f"scope 'class' needs a classification task, got {task.name!r}")
        hnet = make_hypernet(cfg.family, base, scope.dim, cfg)
        phi = hnet.init(base, gen)
        ref = next(iter(base.values()))
        lam = torch.full((scope.dim,), math.log(cfg.init_l2), dtype=ref.dtype, device=ref.device)

        def train_obj(phi_: Params, lam_: Tensor, batch: Any) -> Tensor:
            w = hnet.weights(phi_, lam_)
            return task.loss(w, batch) + scope.penalty(w, lam_)

        def val_obj(lam_: Tensor, phi_: Params, batch: Any) -> Tensor:
            return task.loss(hnet.weights(phi_, lam_), batch)

        phi_grad = _grad_and_value(train_obj)
        lam_grad = _grad_and_value(val_obj)
        adam = make_optimizer("adam")
        phi_opt = adam.init(phi)
        lam_opt = adam.init({"lam": lam})

        tracker = Tracker(self.name, task, seed, logger)
        history: dict[str, list[float]] = {"grad_evals": [], "val_loss": [], "lam": []}
        best_lam = lam.clone()
        status: Any = "ok"
        reason: str | None = None
        n = budget.grad_evals
        if cfg.variant == "global":
            n_phi = max(1, int(round(cfg.global_phi_frac * n)))
            plan = ["phi"] * min(n_phi, n) + ["lam"] * max(0, n - n_phi)
        else:
            n_warm = int(cfg.warmup_frac * n)
            plan = ["phi"] * n_warm + ["phi", "lam"] * ((n - n_warm) // 2)
            plan += ["phi"] * (n - len(plan))
        train_step = val_step = 0
        last_eval = -1

        def evaluate() -> None:
            nonlocal last_eval, best_lam
            w = hnet.weights(phi, lam)
            v = task.evaluate(tree_detach(w), "val")["loss"]
            g = counter.grad_evals
            last_eval = g
            history["grad_evals"].append(g)
            history["val_loss"].append(v)
            history["lam"].append(float(lam.mean()))
            if tracker.observe(g, v):
                best_lam = lam.detach().clone()
            if logger is not None:
                logger.scalar("val/loss", v, g)
                for label, value in scope.hparams(lam).items():
                    logger.scalar(f"hparams/{label}", value, g)

        for kind in plan:
            if not counter.can_spend(1):
                break
            counter.spend(1)
            if kind == "phi":
                if cfg.variant == "global":
                    u = torch.rand(scope.dim, generator=gen, dtype=ref.dtype).to(ref.device)
                    lam_s = cfg.log_low + (cfg.log_high - cfg.log_low) * u  # λ ∼ p(λ)
                else:
                    eps = torch.randn(scope.dim, generator=gen, dtype=ref.dtype).to(ref.device)
                    lam_s = lam + cfg.sigma * eps  # λ ∼ N(λ̂, σ²)
                batch = task.batch("train", train_step, seed)
                train_step += 1
                grads, loss = phi_grad(phi, lam_s, batch)
                phi, phi_opt = adam.update(phi, grads, phi_opt, {"lr": cfg.phi_lr})
                tag = "inner/loss"
            else:
                batch = task.batch("val", val_step, seed)
                val_step += 1
                g_lam, loss = lam_grad(lam, phi, batch)
                new, lam_opt = adam.update(
                    {"lam": lam}, {"lam": g_lam}, lam_opt, {"lr": cfg.lam_lr}
                )
                lam = new["lam"]
                tag = "meta/loss"
            if logger is not None:
                logger.scalar(tag, loss, counter.grad_evals)
            if not (torch.isfinite(loss) and all_finite(phi) and bool(torch.isfinite(lam).all())):
                status, reason = "diverged", f"non-finite {tag} at grad eval {counter.grad_evals}"
                break
            if counter.grad_evals % cfg.eval_every == 0:
                evaluate()
        if status == "ok" and last_eval != counter.grad_evals:
            evaluate()

        final_lam = best_lam
        w_best = tree_detach(hnet.weights(phi, final_lam))
        ok = status == "ok" and all_finite(w_best)
        result = tracker.result(
            tracker.evaluate(w_best) if ok else None,
            counter,
            best_hparams=scope.hparams(final_lam),
            status=status,
            reason=reason,
            extra={
                "config": asdict(cfg),
                "phi_steps": train_step,
                "lam_steps": val_step,
                "final_log_l2": lam.tolist(),
                "best_log_l2": final_lam.tolist(),
            },
        )
        if logger is not None:
            logger.hparams(
                {**result.best_hparams, "variant": cfg.variant, "family": cfg.family},
                {"final/val_loss": result.val_loss, "final/test_loss": result.test_loss},
            )
        return HyperFit(hnet, scope, tree_detach(phi), final_lam, result, history)


def best_response_val_loss(
    fit: HyperFit, task: Task, lams: Tensor, split: str = "val"
) -> list[float]:
    """Loss on ``split`` of w_φ(λ) for each scalar log-L2 weight in ``lams`` (forward only)."""
    return [task.evaluate(fit.weights(float(v)), split)["loss"] for v in lams]
