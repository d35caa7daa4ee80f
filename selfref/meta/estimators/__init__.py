"""Meta-gradient estimators behind one interface (:class:`GradientEstimator`).

One file per estimator; ``make_estimator(name, **options)`` builds one by name and
``ESTIMATORS`` maps the names to ``"module:Class"`` (imported lazily). Each docstring names
the paper and section it follows and states the estimator's bias and variance.

- ``tbptt`` — truncated backpropagation through time (Andrychowicz et al. 2016, §3);
- ``full_bptt`` — backpropagation through the whole horizon;
- ``es`` — antithetic evolution strategies over the whole horizon (Salimans et al. 2017);
- ``truncated_es`` — antithetic ES on each truncation (Vicol et al. 2021);
- ``pes`` — truncated persistent evolution strategies with antithetic pairs (Vicol, Metz &
  Sohl-Dickstein 2021, §4, Alg. 2).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from selfref.meta.estimators.base import Estimate, GradientEstimator, grads_or_zeros

__all__ = [
    "Estimate",
    "GradientEstimator",
    "grads_or_zeros",
    "ESTIMATORS",
    "estimator_names",
    "estimator_options",
    "make_estimator",
]

# name -> "module:Class"
ESTIMATORS: dict[str, str] = {
    "tbptt": "selfref.meta.estimators.tbptt:TruncatedBPTT",
    "full_bptt": "selfref.meta.estimators.full_bptt:FullBPTT",
    "es": "selfref.meta.estimators.es:ES",
    "truncated_es": "selfref.meta.estimators.truncated_es:TruncatedES",
    "pes": "selfref.meta.estimators.pes:PES",
}


def estimator_names() -> list[str]:
    return list(ESTIMATORS)


def _class(name: str) -> Any:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; valid: {', '.join(ESTIMATORS)}")
    module, cls = ESTIMATORS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def estimator_options(name: str) -> list[str]:
    """The keyword options estimator ``name`` accepts."""
    return [p for p in inspect.signature(_class(name).__init__).parameters if p != "self"]


def make_estimator(name: str, **options: Any) -> GradientEstimator:
    """Build an estimator by name.

    Raises:
        ValueError: unknown name or option (both list the valid ones).
    """
    klass = _class(name)
    valid = estimator_options(name)
    bad = sorted(set(options) - set(valid))
    if bad:
        raise ValueError(
            f"estimator {name!r} has no option {', '.join(bad)}; valid: {', '.join(valid)}"
        )
    return klass(**options)
