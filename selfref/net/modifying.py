"""The *modifying* model: a core turns features and its own state into Δθ, applied to θ.

The core (``cores/``: coordinatewise LSTM, hypernetwork, self-referential weight matrix)
owns the learning rule; this module owns applying it — θ' = θ + Δθ, out of place — and the
update statistics that are logged (``modify/update_norm``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from selfref.net.cores.base import Core, CoreState
from selfref.params import Params

__all__ = ["Modifier"]


class Modifier:
    """Applies a core's modification to the normal model's weights.

    Args:
        core: any :class:`~selfref.net.cores.base.Core`.
    """

    def __init__(self, core: Core) -> None:
        self.core = core

    @property
    def feature_dim(self) -> int:
        return self.core.feature_dim

    def init_meta_params(self, generator: torch.Generator) -> Params:
        return self.core.init_meta_params(generator)

    def init_state(self, meta_params: Params, params: Params) -> CoreState:
        return self.core.init_state(meta_params, params)

    def __call__(
        self,
        meta_params: Params,
        params: Params,
        features: dict[str, Tensor],
        state: CoreState,
    ) -> tuple[Params, Params, CoreState, dict[str, Any]]:
        """Returns (θ + Δθ, Δθ, new core state, metrics incl. ``update_norm``)."""
        updates, state, metrics = self.core(meta_params, features, state)
        if updates.keys() != params.keys():
            raise ValueError(
                f"core {self.core.name!r} returned updates for {sorted(updates)}, "
                f"expected {sorted(params)}"
            )
        new_params = {k: params[k] + updates[k] for k in params}
        sq = torch.stack(
            [(u.detach().to(torch.float64) ** 2).sum() for u in updates.values()]
        ).sum()
        metrics = dict(metrics)
        metrics["update_norm"] = torch.sqrt(sq).to(next(iter(params.values())).dtype)
        return new_params, updates, state, metrics
