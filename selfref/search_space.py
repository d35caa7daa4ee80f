"""Typed metaparameter search spaces: float (linear or log), int and categorical dimensions.

A :class:`SearchSpace` names the inner optimizer a trial trains with and the dimensions a
search method tunes. Each dimension maps a point ``u`` of the unit interval to a value
(:meth:`Dimension.from_unit`), so random search is "draw ``u`` uniformly", and a log
dimension is sampled log-uniformly (uniform in ``log x``), as Bergstra & Bengio (2012,
section 2) recommend for scale parameters such as the learning rate. Grid search asks each
dimension for ``n`` points (:meth:`Dimension.grid`), log-spaced for log dimensions.

The default space (:func:`default_space`) tunes SGD with heavy-ball momentum:
``lr`` log-uniform in [1e-3, 1], ``momentum`` uniform in [0, 0.99] and ``weight_decay``
(the optimizer's L2 coefficient, added to the gradient as ``torch.optim.SGD`` does)
log-uniform in [1e-6, 1e-1].

A space can be written in TOML::

    optimizer = "momentum"

    [lr]
    type = "float"
    low = 1e-3
    high = 1.0
    log = true

    [momentum]
    type = "float"
    low = 0.0
    high = 0.99

    [fixed]            # optional: hyperparameters held constant in every trial
    weight_decay = 0.0

Dimension names are the optimizer's hyperparameter names (see
:data:`selfref.optim.DEFAULT_HPARAMS`) or ``l2``, the weights-only L2 penalty of
:func:`selfref.train.train`. Unknown keys, unknown hyperparameter names, empty or inverted
ranges and non-positive log bounds raise ValueError naming the problem.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "Dimension",
    "FloatDim",
    "IntDim",
    "CategoricalDim",
    "SearchSpace",
    "default_space",
    "load_space",
    "TRAIN_HPARAMS",
]

# Hyperparameters that go to train() itself rather than to the optimizer.
TRAIN_HPARAMS: tuple[str, ...] = ("l2",)

_DIM_KEYS: dict[str, tuple[str, ...]] = {
    "float": ("type", "low", "high", "log"),
    "int": ("type", "low", "high", "log"),
    "categorical": ("type", "choices"),
}


def _check_number(where: str, key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: {key} must be a finite number, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class FloatDim:
    """A real interval ``[low, high]``, uniform in ``x`` or (``log=True``) in ``log x``.

    Args:
        name: hyperparameter name, e.g. ``"lr"``.
        low, high: bounds, ``low < high``; both > 0 when ``log``.
        log: sample and grid in log space.
    """

    name: str
    low: float  # lower bound (inclusive)
    high: float  # upper bound (inclusive)
    log: bool = False  # log-uniform sampling and log-spaced grids

    def __post_init__(self) -> None:
        where = f"dimension {self.name!r}"
        lo, hi = _check_number(where, "low", self.low), _check_number(where, "high", self.high)
        if not lo < hi:
            kind = "empty" if lo == hi else "inverted"
            raise ValueError(f"{where}: {kind} range low={lo:g} high={hi:g}; need low < high")
        if self.log and lo <= 0:
            raise ValueError(f"{where}: a log range needs low > 0, got low={lo:g}")

    def from_unit(self, u: float) -> float:
        """The value at fraction ``u`` in [0, 1] of the (log) interval."""
        if self.log:
            a, b = math.log(self.low), math.log(self.high)
            return min(max(math.exp(a + u * (b - a)), self.low), self.high)
        return min(max(self.low + u * (self.high - self.low), self.low), self.high)

    def grid(self, n: int, endpoints: bool = False) -> list[float]:
        """``n`` evenly spaced points (log-spaced if ``log``).

        By default the centres of ``n`` equal cells of the range (n = 1 gives its centre);
        ``endpoints=True`` spans it from bound to bound instead (for n >= 2).
        """
        return [self.from_unit(u) for u in _unit_grid(self.name, n, endpoints)]

    def contains(self, v: Any) -> bool:
        return isinstance(v, (int, float)) and self.low <= float(v) <= self.high

    @property
    def size(self) -> float:
        return math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"type": "float", "low": self.low, "high": self.high, "log": self.log}


@dataclass(frozen=True)
class IntDim:
    """Integers ``low..high`` inclusive, uniform or (``log=True``) log-uniform.

    Args:
        name: hyperparameter name.
        low, high: inclusive integer bounds, ``low < high``; ``low >= 1`` when ``log``.
        log: sample and grid in log space.
    """

    name: str
    low: int  # lower bound (inclusive)
    high: int  # upper bound (inclusive)
    log: bool = False  # log-uniform sampling and log-spaced grids

    def __post_init__(self) -> None:
        where = f"dimension {self.name!r}"
        for key, v in (("low", self.low), ("high", self.high)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(
                    f"{where}: {key} of an int dimension must be an integer, got {v!r}"
                )
        if not self.low < self.high:
            kind = "empty" if self.low == self.high else "inverted"
            raise ValueError(
                f"{where}: {kind} range low={self.low} high={self.high}; need low < high"
            )
        if self.log and self.low < 1:
            raise ValueError(f"{where}: a log range needs low >= 1, got low={self.low}")

    def from_unit(self, u: float) -> int:
        """Each integer gets an equal share of [0, 1] (of log space if ``log``)."""
        if self.log:
            a, b = math.log(self.low), math.log(self.high + 1)
            v = math.floor(math.exp(a + u * (b - a)))
        else:
            v = math.floor(self.low + u * (self.high - self.low + 1))
        return int(min(max(v, self.low), self.high))

    def grid(self, n: int, endpoints: bool = False) -> list[int]:
        """Up to ``n`` distinct integers spread over the range, as :meth:`FloatDim.grid`."""
        return sorted({self.from_unit(u) for u in _unit_grid(self.name, n, endpoints)})

    def contains(self, v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and self.low <= v <= self.high

    @property
    def size(self) -> float:
        return float(self.high - self.low + 1)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "int", "low": self.low, "high": self.high, "log": self.log}


@dataclass(frozen=True)
class CategoricalDim:
    """A finite set of choices (strings, numbers or booleans), drawn uniformly.

    Args:
        name: hyperparameter name.
        choices: at least one distinct value.
    """

    name: str
    choices: tuple[Any, ...]  # the values, in order

    def __post_init__(self) -> None:
        where = f"dimension {self.name!r}"
        if not isinstance(self.choices, tuple):
            object.__setattr__(self, "choices", tuple(self.choices))
        if len(self.choices) == 0:
            raise ValueError(f"{where}: empty list of choices")
        if len(set(map(repr, self.choices))) != len(self.choices):
            raise ValueError(f"{where}: repeated choices in {list(self.choices)}")
        for c in self.choices:
            if not isinstance(c, (str, int, float, bool)):
                raise ValueError(f"{where}: choice {c!r} must be a string, number or boolean")

    def from_unit(self, u: float) -> Any:
        i = min(int(math.floor(u * len(self.choices))), len(self.choices) - 1)
        return self.choices[max(i, 0)]

    def grid(self, n: int | None = None, endpoints: bool = False) -> list[Any]:
        """Every choice (a categorical grid always enumerates all of them)."""
        return list(self.choices)

    def contains(self, v: Any) -> bool:
        return any(type(v) is type(c) and v == c for c in self.choices)

    @property
    def size(self) -> float:
        return float(len(self.choices))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "categorical", "choices": list(self.choices)}


Dimension = FloatDim | IntDim | CategoricalDim


def _unit_grid(name: str, n: int, endpoints: bool) -> list[float]:
    """``n`` fractions of [0, 1]: cell centres ``(i + 0.5) / n``, or ``i / (n - 1)``."""
    if n < 1:
        raise ValueError(f"dimension {name!r}: a grid needs n >= 1 points, got {n}")
    if endpoints and n > 1:
        return [i / (n - 1) for i in range(n)]
    return [(i + 0.5) / n for i in range(n)]


def _valid_hparams(optimizer: str) -> tuple[str, ...]:
    from selfref.optim import make_optimizer

    return tuple(make_optimizer(optimizer).hparam_names) + TRAIN_HPARAMS


def _check_in_range(optimizer: str, name: str, value: Any, where: str) -> None:
    """A bound or value must be one the optimizer (or train's ``l2``) accepts."""
    if name in TRAIN_HPARAMS:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{where}: {name}={value!r} must be a number >= 0")
        return
    from selfref.optim import resolve_hparams

    try:
        resolve_hparams(optimizer, {name: value})
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


@dataclass(frozen=True)
class SearchSpace:
    """The inner optimizer of a trial, the dimensions to tune and hyperparameters held fixed.

    Args:
        dims: the dimensions, in order (their names must be distinct).
        optimizer: a name from :data:`selfref.optim.OPTIMIZERS` that every trial trains with.
        fixed: hyperparameters held constant in every trial (not tuned).

    Example:
        >>> space = SearchSpace((FloatDim("lr", 1e-3, 1.0, log=True),), optimizer="sgd")
        >>> hp = space.sample(torch.Generator().manual_seed(0))
        >>> 1e-3 <= hp["lr"] <= 1.0
        True
    """

    dims: tuple[Dimension, ...]  # what is tuned, in order
    optimizer: str = "momentum"  # inner optimizer of every trial (SGD with momentum)
    fixed: Mapping[str, Any] = field(default_factory=dict)  # constant hyperparameters

    def __post_init__(self) -> None:
        object.__setattr__(self, "dims", tuple(self.dims))
        object.__setattr__(self, "fixed", dict(self.fixed))
        if not self.dims:
            raise ValueError("a search space needs at least one dimension")
        names = [d.name for d in self.dims]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"search space names a dimension twice: {', '.join(dup)}")
        valid = _valid_hparams(self.optimizer)  # raises on an unknown optimizer
        for n in [*names, *self.fixed]:
            if n not in valid:
                raise ValueError(
                    f"unknown hyperparameter {n!r} for optimizer {self.optimizer!r}; "
                    f"valid: {', '.join(valid)}"
                )
        both = sorted(set(names) & set(self.fixed))
        if both:
            raise ValueError(f"hyperparameters both tuned and fixed: {', '.join(both)}")
        for d in self.dims:
            values = d.choices if isinstance(d, CategoricalDim) else (d.low, d.high)
            for v in values:
                _check_in_range(self.optimizer, d.name, v, f"dimension {d.name!r}")
        for n, v in self.fixed.items():
            _check_in_range(self.optimizer, n, v, f"fixed {n}")

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dims]

    def __getitem__(self, name: str) -> Dimension:
        for d in self.dims:
            if d.name == name:
                return d
        raise KeyError(name)

    def from_unit(self, u: Sequence[float]) -> dict[str, Any]:
        """The point at unit-cube coordinates ``u`` (one per dimension), plus the fixed values."""
        if len(u) != len(self.dims):
            raise ValueError(f"need {len(self.dims)} unit coordinates, got {len(u)}")
        out = {d.name: d.from_unit(float(x)) for d, x in zip(self.dims, u)}
        return {**out, **self.fixed}

    def sample(self, generator: torch.Generator) -> dict[str, Any]:
        """One point drawn uniformly in each dimension's (log) scale from ``generator``."""
        u = torch.rand(len(self.dims), generator=generator, dtype=torch.float64)  # (dims,)
        return self.from_unit(u.tolist())

    def grid(
        self, points: Mapping[str, int] | int, endpoints: bool = False
    ) -> list[dict[str, Any]]:
        """The Cartesian grid: ``points`` per dimension (an int for all, or per name).

        Categorical dimensions always contribute all their choices; see
        :meth:`FloatDim.grid` for ``endpoints``. Points are enumerated with the first
        dimension varying slowest.
        """
        per = points if isinstance(points, Mapping) else {n: points for n in self.names}
        unknown = sorted(set(per) - set(self.names))
        if unknown:
            raise ValueError(f"grid points name unknown dimensions {unknown}; valid: {self.names}")
        axes = [d.grid(int(per.get(d.name, 1)), endpoints) for d in self.dims]
        out: list[dict[str, Any]] = [{}]
        for d, axis in zip(self.dims, axes):
            out = [{**p, d.name: v} for p in out for v in axis]
        return [{**p, **self.fixed} for p in out]

    def contains(self, hparams: Mapping[str, Any]) -> bool:
        return all(d.name in hparams and d.contains(hparams[d.name]) for d in self.dims)

    def split(self, hparams: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(optimizer hyperparameters, train() keyword arguments such as ``l2``)."""
        opt = {k: v for k, v in hparams.items() if k not in TRAIN_HPARAMS}
        kw = {k: v for k, v in hparams.items() if k in TRAIN_HPARAMS}
        return opt, kw

    def to_dict(self) -> dict[str, Any]:
        """The TOML/JSON form (``from_dict(to_dict())`` round-trips)."""
        d: dict[str, Any] = {"optimizer": self.optimizer}
        for dim in self.dims:
            d[dim.name] = dim.to_dict()
        if self.fixed:
            d["fixed"] = dict(self.fixed)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "search space") -> SearchSpace:
        """Build from the TOML layout (see the module docstring).

        Raises:
            ValueError: an unknown key, a dimension without ``type`` or with an unknown one,
                a missing bound, an empty or inverted range, an unknown hyperparameter name.
        """
        optimizer = d.get("optimizer", "momentum")
        if not isinstance(optimizer, str):
            raise ValueError(f"{where}: optimizer must be a string, got {optimizer!r}")
        fixed = d.get("fixed", {})
        if not isinstance(fixed, Mapping):
            raise ValueError(f"{where}: [fixed] must be a table, got {fixed!r}")
        dims: list[Dimension] = []
        for name, spec in d.items():
            if name in ("optimizer", "fixed"):
                continue
            if not isinstance(spec, Mapping):
                raise ValueError(
                    f"{where}: unknown key {name!r} = {spec!r}; top-level keys are 'optimizer', "
                    "'fixed' and one table per dimension"
                )
            dims.append(_dim_from_dict(name, spec, where))
        return cls(tuple(dims), optimizer=optimizer, fixed=dict(fixed))


def _dim_from_dict(name: str, spec: Mapping[str, Any], where: str) -> Dimension:
    kind = spec.get("type")
    if kind not in _DIM_KEYS:
        raise ValueError(
            f"{where}: dimension {name!r} has type {kind!r}; valid types: {', '.join(_DIM_KEYS)}"
        )
    unknown = sorted(set(spec) - set(_DIM_KEYS[kind]))
    if unknown:
        raise ValueError(
            f"{where}: dimension {name!r} has unknown keys {unknown}; valid keys for a {kind} "
            f"dimension: {', '.join(_DIM_KEYS[kind])}"
        )
    if kind == "categorical":
        if "choices" not in spec or not isinstance(spec["choices"], list):
            raise ValueError(f"{where}: categorical dimension {name!r} needs a list 'choices'")
        return CategoricalDim(name, tuple(spec["choices"]))
    for key in ("low", "high"):
        if key not in spec:
            raise ValueError(f"{where}: dimension {name!r} needs '{key}'")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ValueError(f"{where}: dimension {name!r}: log must be true or false, got {log!r}")
    if kind == "int":
        return IntDim(name, spec["low"], spec["high"], log=log)
    low = _check_number(f"dimension {name!r}", "low", spec["low"])
    high = _check_number(f"dimension {name!r}", "high", spec["high"])
    return FloatDim(name, low, high, log=log)


def load_space(path: str | Path) -> SearchSpace:
    """Read a :class:`SearchSpace` from a TOML file (see the module docstring).

    Raises:
        ValueError: a missing or unparsable file, or any problem :meth:`SearchSpace.from_dict`
            reports (prefixed with the file name).
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"search space file {str(p)!r} does not exist")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"search space file {str(p)!r} is not valid TOML: {e}") from e
    return SearchSpace.from_dict(data, where=str(p))


def default_space(task: Any = None) -> SearchSpace:
    """The default space for a task: SGD with momentum, log lr, momentum, log weight decay.

    The same for every task today (``task`` is accepted so a task family can get its own).
    """
    return SearchSpace(
        (
            FloatDim("lr", 1e-3, 1.0, log=True),
            FloatDim("momentum", 0.0, 0.99),
            FloatDim("weight_decay", 1e-6, 1e-1, log=True),
        ),
        optimizer="momentum",
    )
