"""An ensemble of learned optimizers: the mean of several cores' updates.

Restarts of one meta-training recipe — same configuration, different seeds — end at
learned optimizers that differ on tasks outside their distribution by more than most recipe
changes do (README, selection rounds 14–15: restarts of the ``lopt`` preset spread by 0.035
to 0.053 in log10 loss ratio). Averaging the predictions of independently trained models is
the oldest way to remove such seed variance (bagging, Breiman 1996; deep ensembles,
Lakshminarayanan et al. 2017); here the prediction is the step. The ensemble core holds M
members of one core type (each with its own φ and state), gives every member the same
features — they share the analyzer, so the members must have been meta-trained with one
analyzer configuration — and applies

    Δθ = (1/M) Σ_m Δθ^(m).

Every member's state moves on its own rule along the trajectory the mean makes (the step
each member would have taken is never applied), so it reads what the ensemble did — as a
member of any committee does. The ensemble costs M times the optimizer's own compute per
step and no extra gradient evaluation: the features, the gradient and the held-out read are
computed once.

Meta-parameters are the members', prefixed ``m{i}.``; so is the state. An ensemble of cores
that run packed (the ``lopt`` core) runs packed too (:meth:`EnsembleCore.packed`). Metrics are the
members' means under the members' names. ``member_options`` are the keyword options of
``make_core(member, ...)`` (with ``feature_dim``, which the members must share).

The shipped ensemble is built from finished meta-training runs
(:func:`selfref.meta.ensemble.ensemble_checkpoint`): ``selfref meta-train --preset
lopt-ensemble`` runs its members' restarts and composes them. (The engine can also
meta-train an ensemble core as one φ, as it does any registered core; that trains the
members jointly, which is not bagging.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor

from selfref.net.cores.base import Core, CoreState, build_config
from selfref.net.packing import Segments
from selfref.params import Params

__all__ = ["EnsembleConfig", "EnsembleCore"]


@dataclass(frozen=True)
class EnsembleConfig:
    """M members of the core ``member``, each built with ``member_options``."""

    member: str = "lopt"
    members: int = 2
    member_options: dict[str, Any] = field(default_factory=dict)
    feature_dim: int = 0  # 0: the members'; else it must equal the members'

    def __post_init__(self) -> None:
        if self.member == "ensemble":
            raise ValueError("an ensemble's members cannot be ensembles")
        if self.members < 1:
            raise ValueError(f"an ensemble needs members >= 1, got {self.members}")


class EnsembleCore:
    """The mean update of ``members`` cores of one type, each with its own φ and state."""

    name: ClassVar[str] = "ensemble"

    def __init__(self, config: EnsembleConfig | None = None, **options: Any) -> None:
        from selfref.net.cores import make_core

        self.config = build_config(EnsembleConfig, config, options, self.name)
        opts = dict(self.config.member_options)
        if self.config.feature_dim:
            if opts.get("feature_dim", self.config.feature_dim) != self.config.feature_dim:
                raise ValueError(
                    f"ensemble feature_dim {self.config.feature_dim} differs from its "
                    f"members' {opts['feature_dim']}"
                )
            opts["feature_dim"] = self.config.feature_dim
        self.member: Core = make_core(self.config.member, **opts)
        self.feature_dim: int = self.member.feature_dim

    @staticmethod
    def _split(tree: dict[str, Tensor], m: int) -> dict[str, Tensor]:
        prefix = f"m{m}."
        return {k[len(prefix) :]: v for k, v in tree.items() if k.startswith(prefix)}

    @staticmethod
    def _join(trees: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {f"m{m}.{k}": v for m, tree in enumerate(trees) for k, v in tree.items()}

    def init_meta_params(self, generator: torch.Generator) -> Params:
        """Every member's fresh φ, drawn one after the other from ``generator``."""
        return self._join(
            [self.member.init_meta_params(generator) for _ in range(self.config.members)]
        )

    def init_state(self, meta_params: Params, params: Params) -> CoreState:
        return self._join(
            [
                self.member.init_state(self._split(meta_params, m), params)
                for m in range(self.config.members)
            ]
        )

    def __call__(
        self, meta_params: Params, features: dict[str, Tensor], state: CoreState
    ) -> tuple[Params, CoreState, dict[str, Any]]:
        steps, states, metrics = self._each_member(meta_params, state, features, self.member)
        n = self.config.members
        updates = {k: sum((s[k] for s in steps[1:]), steps[0][k]) / n for k in steps[0]}
        return updates, states, metrics

    @property
    def packs(self) -> bool:
        """Whether :meth:`packed` runs: the members' core runs packed (the ``lopt`` core)."""
        return hasattr(self.member, "packed")

    def packed(
        self, meta_params: Params, features: Tensor, state: CoreState, segments: Segments
    ) -> tuple[Tensor, CoreState, dict[str, Any]]:
        """:meth:`__call__` on packed tensors of m instances (the members' ``packed``:
        features (m, n, F) in ``segments``' layout -> the mean of their packed steps (m, n),
        their states, the means of their metrics (m,)). The same mathematics as
        :meth:`__call__`, to the members' float rounding."""
        if not self.packs:
            raise ValueError(f"an ensemble of {self.config.member!r} cores does not run packed")
        member = partial(self.member.packed, segments=segments)  # type: ignore[attr-defined]
        steps, states, metrics = self._each_member(meta_params, state, features, member)
        return sum(steps[1:], steps[0]) / self.config.members, states, metrics

    def _each_member(
        self, meta_params: Params, state: CoreState, features: Any, step: Any
    ) -> tuple[list[Any], CoreState, dict[str, Any]]:
        """Every member's ``step(φ_m, features, state_m)`` -> (its step, its state, its
        metrics), in member order: the steps as a list, the states joined, the metrics
        averaged."""
        self._check_members(meta_params)
        outs = [
            step(self._split(meta_params, m), features, self._split(state, m))
            for m in range(self.config.members)
        ]
        steps = [o[0] for o in outs]
        return steps, self._join([o[1] for o in outs]), self._mean_metrics([o[2] for o in outs])

    def _check_members(self, meta_params: Params) -> None:
        n = self.config.members
        if not any(k.startswith(f"m{n - 1}.") for k in meta_params) or any(
            k.startswith(f"m{n}.") for k in meta_params
        ):
            raise ValueError(f"ensemble meta-parameters do not hold exactly {n} members")

    @staticmethod
    def _mean_metrics(metrics: list[dict[str, Any]]) -> dict[str, Any]:
        """The members' metrics averaged, under their names (those every member has)."""
        return {
            k: torch.stack([torch.as_tensor(met[k]) for met in metrics]).mean(0)
            for k in metrics[0]
            if all(k in met for met in metrics)
        }
