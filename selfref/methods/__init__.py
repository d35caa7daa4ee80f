"""Meta-optimizers behind one interface (``Method.run(task, budget, logger, seed)``).

One file per method: ``grid.py``, ``random.py`` (search baselines, Bergstra & Bengio 2012),
``bayes.py`` (Optuna TPE/GP adapters, extra ``selfref[optuna]``), ``rmad.py`` (Maclaurin et
al. 2015), ``hypernet.py`` (Lorraine & Duvenaud 2018), ``complexity.py`` (Grebenkova et al.
2021), ``learned.py`` (the self-referential network as a method). ``make(name, **options)``
builds one; ``names()`` lists those whose dependencies are installed.
"""

from __future__ import annotations

import importlib
from typing import Any

from selfref.methods.base import CurvePoint, Method, Result, Status

__all__ = ["Method", "Result", "Status", "CurvePoint", "make", "names", "missing"]

# name -> "module:Class"; imported lazily so a missing optional extra only hides its method.
_REGISTRY: dict[str, str] = {
    "grid": "selfref.methods.grid:GridSearch",
    "random": "selfref.methods.random:RandomSearch",
    "tpe": "selfref.methods.bayes:TPE",
    "gp": "selfref.methods.bayes:GP",
    "rmad": "selfref.methods.rmad:RMAD",
    "hypernet": "selfref.methods.hypernet:HypernetHPO",
    "selfref": "selfref.methods.learned:SelfRefMethod",
    "rnn-bo": "selfref.methods.rnn_bo:RNNBO",
    "hyperband": "selfref.methods.hyperband:Hyperband",
    "asha": "selfref.methods.hyperband:ASHA",
}


def _load(name: str) -> Any:
    module, cls = _REGISTRY[name].split(":")
    mod = importlib.import_module(module)
    return getattr(mod, cls)


def missing() -> dict[str, str]:
    """{name: why} for registered methods that cannot be built here (e.g. missing extra)."""
    out = {}
    for n in _REGISTRY:
        try:
            cls = _load(n)
            check = getattr(cls, "check_available", None)
            if check is not None:
                check()
        except (ImportError, AttributeError) as e:
            out[n] = str(e)
    return out


def names() -> list[str]:
    """Registered methods that are installed and importable, in registry order."""
    gone = missing()
    return [n for n in _REGISTRY if n not in gone]


def make(name: str, **options: Any) -> Method:
    """Build a method by name.

    Raises:
        ValueError: unknown name (lists the known ones), a method whose optional dependency is
            missing (names the extra to install), or a bad option.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(_REGISTRY)}")
    gone = missing()
    if name in gone:
        raise ValueError(f"method {name!r} is not available: {gone[name]}")
    cls = _load(name)
    try:
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"bad option for method {name!r}: {e}") from e
