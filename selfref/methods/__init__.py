"""Meta-optimizers behind one interface (``Method.run(task, budget, logger, seed)``).

One file per method: ``grid.py``, ``random.py`` (search baselines, Bergstra & Bengio 2012),
``bayes.py`` (Optuna TPE/GP adapters, extra ``selfref[optuna]``), ``rmad.py`` (Maclaurin et
al. 2015), ``hypernet.py`` (Lorraine & Duvenaud 2018), ``complexity.py`` (Grebenkova et al.
2021), ``learned.py`` (the self-referential network as a method), ``rnn_bo.py`` (the
learned black-box optimizer of Chen et al. 2017), ``hyperband.py`` (Hyperband, Li et al.
2017, and ASHA, Li et al. 2020, on gradient-evaluation rungs). ``make(name, **options)``
builds one; ``names()`` lists those whose dependencies are installed; ``method_class(name)``
gives the class and ``check_options(name, options)`` validates a user's options without
running anything.

A method's options are its constructor's named parameters; a constructor that takes
``**options`` declares them as the fields of a dataclass ``options_class`` (e.g. RMAD's
:class:`~selfref.methods.rmad.RMADConfig`). :data:`HARNESS_OPTIONS` are set by the
comparison harness, not by users.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from selfref.methods.base import CurvePoint, Method, Result, Status
from selfref.options import check_options as _check_signature
from selfref.options import option_hints

__all__ = [
    "Method",
    "Result",
    "Status",
    "CurvePoint",
    "REGISTRY",
    "HARNESS_OPTIONS",
    "make",
    "names",
    "missing",
    "method_class",
    "user_options",
    "check_options",
]

# name -> "module:Class"; imported lazily so a missing optional extra only hides its method.
# Read-only: a new method is one more entry here.
REGISTRY: Mapping[str, str] = MappingProxyType(
    {
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
)

# Constructor parameters the comparison harness fills in (a search space object, the shared
# executor, the run directory, the trial function, the Optuna storage URL, a logger per
# trial); --space, --workers/--cluster, the run directory and --storage set them.
HARNESS_OPTIONS: tuple[str, ...] = (
    "space",
    "executor",
    "run_dir",
    "trial_fn",
    "storage",
    "trial_logger",
)


def _import(name: str) -> Any:
    module, cls = REGISTRY[name].split(":")
    mod = importlib.import_module(module)
    return getattr(mod, cls)


def missing() -> dict[str, str]:
    """{name: why} for registered methods that cannot be built here (e.g. missing extra)."""
    out = {}
    for n in REGISTRY:
        try:
            cls = _import(n)
            check = getattr(cls, "check_available", None)
            if check is not None:
                check()
        except (ImportError, AttributeError) as e:
            out[n] = str(e)
    return out


def names() -> list[str]:
    """Registered methods that are installed and importable, in registry order."""
    gone = missing()
    return [n for n in REGISTRY if n not in gone]


def method_class(name: str) -> Any:
    """The class registered as ``name`` (its module imported, nothing built).

    Raises:
        ValueError: unknown name (lists the known ones) or a method whose optional
            dependency is missing (names the extra to install).
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(REGISTRY)}")
    gone = missing()
    if name in gone:
        raise ValueError(f"method {name!r} is not available: {gone[name]}")
    return _import(name)


def user_options(name: str) -> dict[str, Any] | None:
    """{option: type hint} a user may set for method ``name`` (``--method-option``); None
    when the method takes ``**options`` without declaring them (its constructor checks)."""
    return option_hints(method_class(name), exclude=HARNESS_OPTIONS)


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Validate a user's options for method ``name`` before any work.

    Unknown options (the message names the valid ones) and values of the wrong type are
    rejected first; then the method is constructed with them, so its own checks of values
    (an unknown grid order, a non-positive count, a missing checkpoint file) run now too.
    Constructing a method does no work.

    Raises:
        ValueError: one line naming the method, the option and what would be valid.
    """
    cls = method_class(name)
    owner = f"method {name!r}"
    for key in options:
        if key in HARNESS_OPTIONS:
            raise ValueError(
                f"{owner} option {key!r} is set by the comparison (--space, --workers, --cluster, "
                "--storage, the run directory), not as a method option"
            )
    _check_signature(owner, cls, options, exclude=HARNESS_OPTIONS)
    _build(name, cls, options)


def _build(name: str, cls: Any, options: Mapping[str, Any]) -> Method:
    try:
        return cls(**options)
    except TypeError as e:
        raise ValueError(f"bad option for method {name!r}: {e}") from e
    except ValueError as e:
        raise ValueError(f"method {name!r}: {e}") from e


def make(name: str, **options: Any) -> Method:
    """Build a method by name.

    Raises:
        ValueError: unknown name (lists the known ones), a method whose optional dependency is
            missing (names the extra to install), an unknown option (lists the valid ones), a
            value of the wrong type, or a bad value.
    """
    cls = method_class(name)
    _check_signature(f"method {name!r}", cls, options)
    return _build(name, cls, options)
