"""The modifying model's core: the contract every core implements.

A core turns per-coordinate features (from the analyzing model) and its own state into a
modification Δθ of the normal model's parameters. It is functional: its meta-parameters φ
are an explicit ``Params`` dict, its state an explicit dict of tensors, nothing lives on
``self`` but configuration. Cores: ``lstm.py`` (coordinatewise LSTM, Andrychowicz et al.
2016), ``hypernet.py`` (per-tensor hypernetwork, Ha et al. 2016 / VeLO), ``srwm.py``
(self-referential weight matrix, Irie et al. 2022).

Shapes: features for a parameter tensor of shape S are (*S, F); the update has shape S. A
core may treat coordinates independently (LSTM), per tensor (hypernetwork), or read and
rewrite its own fast weights (SRWM) — the state is free-form so long as it is a dict of
tensors (``CoreState``) that ``torch.func.vmap`` can map over.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

from selfref.params import Params

__all__ = ["Core", "CoreState", "as_dtype", "build_config", "check_feature_dim"]

CoreState = dict[str, Tensor]

C = TypeVar("C")


def as_dtype(meta_params: Params, dtype: torch.dtype) -> Params:
    """φ in the features' ``dtype`` (tensors already in it as they are: no op to dispatch,
    which on small steps is most of the cost)."""
    return {k: v if v.dtype == dtype else v.to(dtype) for k, v in meta_params.items()}


def check_feature_dim(features: dict[str, Tensor], feature_dim: int) -> None:
    """Raise ValueError naming the first parameter whose features are not ``feature_dim`` wide."""
    for k, f in features.items():
        if f.shape[-1] != feature_dim:
            raise ValueError(
                f"features[{k!r}] has {f.shape[-1]} features per coordinate; "
                f"this core expects feature_dim={feature_dim}"
            )


def build_config(config_cls: type[C], config: C | None, options: dict[str, Any], core: str) -> C:
    """A core's config from either a config object or keyword options (never both).

    Raises:
        ValueError: both given, or an option that ``config_cls`` does not have (the message
            names the unknown options and the valid ones).
    """
    if config is not None and options:
        raise ValueError(f"give either a {config_cls.__name__} or keyword options, not both")
    if config is not None:
        return config
    valid = sorted(f.name for f in fields(config_cls))  # type: ignore[arg-type]
    bad = sorted(set(options) - set(valid))
    if bad:
        raise ValueError(f"unknown {core} core option(s) {bad} (bad name); valid: {valid}")
    return config_cls(**options)


@runtime_checkable
class Core(Protocol):
    """A modifier core.

    Attributes:
        name: registry name (``"lstm"``, ``"hypernet"``, ``"srwm"``).
        feature_dim: F, the per-coordinate feature size it expects.
    """

    name: ClassVar[str]
    feature_dim: int

    def init_meta_params(self, generator: torch.Generator) -> Params:
        """Fresh meta-parameters φ (the weights of the core itself)."""
        ...

    def init_state(self, meta_params: Params, params: Params) -> CoreState:
        """Initial state for modifying ``params`` (e.g. zero LSTM states per coordinate)."""
        ...

    def __call__(
        self, meta_params: Params, features: dict[str, Tensor], state: CoreState
    ) -> tuple[Params, CoreState, dict[str, Any]]:
        """Map features {name: (*S, F)} to updates {name: S}; return new state and metrics."""
        ...
