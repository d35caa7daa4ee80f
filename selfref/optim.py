"""Functional inner optimizers: pure ``init``/``update`` over parameter dicts.

Each optimizer reproduces the update rule of its ``torch.optim`` counterpart exactly
(``torch.optim.SGD`` without/with heavy-ball or Nesterov momentum and dampening 0,
``torch.optim.RMSprop`` with momentum 0 and centered False, ``torch.optim.Adam`` with bias
correction and L2 weight decay added to the gradient), but as a pure function::

    state = opt.init(params)
    params, state = opt.update(params, grads, state, {"lr": 0.01})

Nothing is mutated: ``update`` returns new dicts. Every operation is an out-of-place tensor
op, so gradients flow through ``update`` to the parameters, the gradients and to any
hyperparameter passed as a tensor (e.g. ``lr = torch.tensor(0.1, requires_grad=True)``) —
which is what meta-gradient methods (RMAD, learned learning rates) differentiate.

State layout (``OptState``): one parameter dict per buffer (``"momentum_buffer"``,
``"square_avg"``, ``"exp_avg"``, ``"exp_avg_sq"``) plus ``"step"``, a 0-d tensor counting
the updates taken.

Notation: θ – parameters, g – gradient, t – step (1-based inside an update), λ – weight decay.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from selfref.params import Params

__all__ = [
    "OptState",
    "FunctionalOptimizer",
    "SGD",
    "Momentum",
    "Nesterov",
    "RMSprop",
    "Adam",
    "OPTIMIZERS",
    "DEFAULT_HPARAMS",
    "make_optimizer",
    "resolve_hparams",
    "LR_SCHEDULES",
    "check_lr_schedule",
    "cosine_decay",
]

# {"momentum_buffer": Params, ..., "step": 0-d Tensor}; Any because "step" is a bare tensor.
OptState = dict[str, Any]
Hparam = float | Tensor

OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "nesterov", "rmsprop", "adam")

# learning-rate schedules the training loops share (meta-training, in-context, complexity)
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")


def check_lr_schedule(name: str) -> None:
    """Raise ``ValueError`` naming the valid schedules unless ``name`` is one of them."""
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {name!r}; valid: {', '.join(LR_SCHEDULES)}")


def cosine_decay(frac: float) -> float:
    """½(1 + cos(π·frac)) for frac clipped to [0, 1]: the cosine factor from 1 down to 0."""
    return 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, frac))))


DEFAULT_HPARAMS: dict[str, dict[str, float]] = {
    "sgd": {
        "lr": 0.1,  # a working value on the digits tasks (torch.optim.SGD's default is 1e-3)
        "weight_decay": 0.0,  # L2 coefficient added to the gradient, as torch.optim.SGD
    },
    "momentum": {
        "lr": 0.1,  # as sgd
        "momentum": 0.9,  # heavy-ball coefficient μ
        "weight_decay": 0.0,  # L2 added to the gradient
    },
    "nesterov": {
        "lr": 0.1,  # as sgd
        "momentum": 0.9,  # Nesterov coefficient μ
        "weight_decay": 0.0,  # L2 added to the gradient
    },
    "rmsprop": {
        "lr": 0.01,  # torch.optim.RMSprop default
        "alpha": 0.99,  # smoothing of the squared-gradient average (torch default)
        "eps": 1e-8,  # added to the root of the average (torch default)
        "weight_decay": 0.0,  # L2 added to the gradient
    },
    "adam": {
        "lr": 1e-3,  # Kingma & Ba 2015 / torch.optim.Adam default
        "beta1": 0.9,  # first-moment decay
        "beta2": 0.999,  # second-moment decay
        "eps": 1e-8,  # added to the bias-corrected root second moment
        "weight_decay": 0.0,  # L2 added to the gradient (not AdamW's decoupled decay)
    },
}

# Allowed ranges of float hyperparameters: (low, high, low inclusive, high inclusive).
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "lr": (0.0, math.inf, False, False),
    "momentum": (0.0, 1.0, True, False),
    "weight_decay": (0.0, math.inf, True, False),
    "alpha": (0.0, 1.0, True, False),
    "beta1": (0.0, 1.0, True, False),
    "beta2": (0.0, 1.0, True, False),
    "eps": (0.0, math.inf, False, False),
}


def _check_value(opt: str, name: str, v: Hparam) -> None:
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(
                f"{opt} hyperparameter {name!r} must be a scalar, got shape {tuple(v.shape)}"
            )
        return  # values of tensors are not checked: that would sync and break tracing
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{opt} hyperparameter {name!r} must be a number or tensor, got {v!r}")
    lo, hi, lo_inc, hi_inc = _RANGES[name]
    ok = (v >= lo if lo_inc else v > lo) and (v <= hi if hi_inc else v < hi) and math.isfinite(v)
    if not ok:
        interval = f"{'[' if lo_inc else '('}{lo:g}, {hi:g}{']' if hi_inc else ')'}"
        raise ValueError(f"{opt} hyperparameter {name}={v!r} is out of range; valid: {interval}")


def resolve_hparams(name: str, hparams: Mapping[str, Hparam] | None = None) -> dict[str, Hparam]:
    """The optimizer's defaults overridden by ``hparams``, validated.

    Raises:
        ValueError: unknown optimizer, a name the optimizer does not take (the message lists
            the valid ones), or a float value out of range (e.g. ``lr <= 0``).
    """
    if name not in DEFAULT_HPARAMS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    out: dict[str, Hparam] = dict(DEFAULT_HPARAMS[name])
    for k, v in (hparams or {}).items():
        if k not in out:
            raise ValueError(
                f"optimizer {name!r} has no hyperparameter {k!r}; valid: {', '.join(out)}"
            )
        _check_value(name, k, v)
        out[k] = v
    return out


@runtime_checkable
class FunctionalOptimizer(Protocol):
    """A pure optimizer: ``init(params) -> state``; ``update(...) -> (params, state)``."""

    name: ClassVar[str]
    hparam_names: ClassVar[tuple[str, ...]]

    def init(self, params: Params) -> OptState: ...

    def update(
        self,
        params: Params,
        grads: Params,
        state: OptState,
        hparams: Mapping[str, float | Tensor],
    ) -> tuple[Params, OptState]: ...


def _step0(params: Params) -> Tensor:
    """The step counter, a 0-d tensor on the params' device (float64 unless that is absent)."""
    first = next(iter(params.values()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = torch.float32 if device.type == "mps" else torch.float64
    return torch.zeros((), dtype=dtype, device=device)


def _check_keys(params: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> None:
    if params.keys() != grads.keys():
        raise ValueError(f"grads keys {sorted(grads)} differ from params keys {sorted(params)}")


def _with_decay(g: Tensor, p: Tensor, wd: Hparam) -> Tensor:
    """g + λθ, as torch.optim adds (non-decoupled) weight decay to the gradient."""
    if isinstance(wd, Tensor) or wd != 0:
        return g + wd * p
    return g


class _Base:
    name: ClassVar[str] = ""
    hparam_names: ClassVar[tuple[str, ...]] = ()

    def hparams(self, hparams: Mapping[str, Hparam] | None = None) -> dict[str, Hparam]:
        """Defaults merged with ``hparams`` and validated (see :func:`resolve_hparams`)."""
        return resolve_hparams(self.name, hparams)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SGD(_Base):
    """Plain SGD, ``torch.optim.SGD(momentum=0)``: θ ← θ − lr (g + λθ).

    References:
        Robbins & Monro 1951; the update of ``torch.optim.SGD``.
    """

    name: ClassVar[str] = "sgd"
    hparam_names: ClassVar[tuple[str, ...]] = ("lr", "weight_decay")

    def init(self, params: Params) -> OptState:
        return {"step": _step0(params)}

    def update(
        self,
        params: Params,
        grads: Params,
        state: OptState,
        hparams: Mapping[str, float | Tensor],
    ) -> tuple[Params, OptState]:
        _check_keys(params, grads)
        h = self.hparams(hparams)
        lr, wd = h["lr"], h["weight_decay"]
        new = {k: p - lr * _with_decay(grads[k], p, wd) for k, p in params.items()}
        return new, {"step": state["step"] + 1}


class Momentum(_Base):
    """SGD with heavy-ball momentum, ``torch.optim.SGD(momentum=μ, dampening=0)``.

    b ← μ b + (g + λθ) (b starts at 0, so b₁ = g₁ exactly as torch's first-step clone);
    θ ← θ − lr b.

    References:
        Polyak 1964, "Some methods of speeding up the convergence of iteration methods";
        Sutskever et al. 2013 (the form torch uses).
    """

    name: ClassVar[str] = "momentum"
    hparam_names: ClassVar[tuple[str, ...]] = ("lr", "momentum", "weight_decay")
    nesterov: ClassVar[bool] = False

    def init(self, params: Params) -> OptState:
        return {
            "momentum_buffer": {k: torch.zeros_like(p) for k, p in params.items()},
            "step": _step0(params),
        }

    def update(
        self,
        params: Params,
        grads: Params,
        state: OptState,
        hparams: Mapping[str, float | Tensor],
    ) -> tuple[Params, OptState]:
        _check_keys(params, grads)
        h = self.hparams(hparams)
        lr, mu, wd = h["lr"], h["momentum"], h["weight_decay"]
        bufs: Params = {}
        new: Params = {}
        for k, p in params.items():
            g = _with_decay(grads[k], p, wd)
            b = mu * state["momentum_buffer"][k] + g
            d = g + mu * b if self.nesterov else b
            bufs[k] = b
            new[k] = p - lr * d
        return new, {"momentum_buffer": bufs, "step": state["step"] + 1}


class Nesterov(Momentum):
    """Nesterov momentum, ``torch.optim.SGD(momentum=μ, nesterov=True, dampening=0)``.

    b ← μ b + (g + λθ); θ ← θ − lr ((g + λθ) + μ b).

    References:
        Nesterov 1983; Sutskever et al. 2013, "On the importance of initialization and
        momentum in deep learning", section 2 (the reformulation torch implements).
    """

    name: ClassVar[str] = "nesterov"
    nesterov: ClassVar[bool] = True


class RMSprop(_Base):
    """RMSprop, ``torch.optim.RMSprop(momentum=0, centered=False)``.

    v ← α v + (1 − α) g²; θ ← θ − lr g / (√v + ε) with g including λθ.

    References:
        Tieleman & Hinton 2012, Lecture 6.5 of "Neural Networks for Machine Learning".
    """

    name: ClassVar[str] = "rmsprop"
    hparam_names: ClassVar[tuple[str, ...]] = ("lr", "alpha", "eps", "weight_decay")

    def init(self, params: Params) -> OptState:
        return {
            "square_avg": {k: torch.zeros_like(p) for k, p in params.items()},
            "step": _step0(params),
        }

    def update(
        self,
        params: Params,
        grads: Params,
        state: OptState,
        hparams: Mapping[str, float | Tensor],
    ) -> tuple[Params, OptState]:
        _check_keys(params, grads)
        h = self.hparams(hparams)
        lr, alpha, eps, wd = h["lr"], h["alpha"], h["eps"], h["weight_decay"]
        sq: Params = {}
        new: Params = {}
        for k, p in params.items():
            g = _with_decay(grads[k], p, wd)
            v = alpha * state["square_avg"][k] + (1 - alpha) * (g * g)
            sq[k] = v
            new[k] = p - lr * g / (torch.sqrt(v) + eps)
        return new, {"square_avg": sq, "step": state["step"] + 1}


class Adam(_Base):
    """Adam with bias correction, ``torch.optim.Adam(amsgrad=False)``.

    m ← β₁ m + (1 − β₁) g; v ← β₂ v + (1 − β₂) g²;
    θ ← θ − (lr / (1 − β₁ᵗ)) m / (√v / √(1 − β₂ᵗ) + ε), with g including λθ (L2, as
    torch.optim.Adam; not AdamW).

    References:
        Kingma & Ba 2015, "Adam: A method for stochastic optimization", Algorithm 1 (with
        ε added after the bias correction of √v, as torch does).
    """

    name: ClassVar[str] = "adam"
    hparam_names: ClassVar[tuple[str, ...]] = ("lr", "beta1", "beta2", "eps", "weight_decay")

    def init(self, params: Params) -> OptState:
        return {
            "exp_avg": {k: torch.zeros_like(p) for k, p in params.items()},
            "exp_avg_sq": {k: torch.zeros_like(p) for k, p in params.items()},
            "step": _step0(params),
        }

    def update(
        self,
        params: Params,
        grads: Params,
        state: OptState,
        hparams: Mapping[str, float | Tensor],
    ) -> tuple[Params, OptState]:
        _check_keys(params, grads)
        h = self.hparams(hparams)
        lr, b1, b2, eps, wd = h["lr"], h["beta1"], h["beta2"], h["eps"], h["weight_decay"]
        t = state["step"] + 1  # 0-d tensor
        bc1 = 1 - b1**t
        bc2_sqrt = torch.sqrt(1 - b2**t)
        step_size = lr / bc1
        m_new: Params = {}
        v_new: Params = {}
        new: Params = {}
        for k, p in params.items():
            g = _with_decay(grads[k], p, wd)
            m = b1 * state["exp_avg"][k] + (1 - b1) * g
            v = b2 * state["exp_avg_sq"][k] + (1 - b2) * (g * g)
            m_new[k], v_new[k] = m, v
            new[k] = p - step_size * m / (torch.sqrt(v) / bc2_sqrt + eps)
        return new, {"exp_avg": m_new, "exp_avg_sq": v_new, "step": t}


_CLASSES: dict[str, type[_Base]] = {
    "sgd": SGD,
    "momentum": Momentum,
    "nesterov": Nesterov,
    "rmsprop": RMSprop,
    "adam": Adam,
}


def make_optimizer(name: str) -> FunctionalOptimizer:
    """Build a functional optimizer by name (one of :data:`OPTIMIZERS`).

    Raises:
        ValueError: unknown name; the message lists the valid ones.

    Example:
        >>> opt = make_optimizer("adam")
        >>> p = {"w": torch.ones(3)}
        >>> s = opt.init(p)
        >>> p, s = opt.update(p, {"w": torch.ones(3)}, s, {"lr": 0.1})
        >>> [round(float(x), 4) for x in p["w"]]
        [0.9, 0.9, 0.9]
    """
    if name not in _CLASSES:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    return _CLASSES[name]()  # type: ignore[return-value]
