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
from selfref.net.packing import Segments
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

    @property
    def packs(self) -> bool:
        """Whether the core runs on packed tensors (has ``packed``, as the ``lopt`` core; an
        ensemble core says so itself, by its members' core)."""
        return bool(getattr(self.core, "packs", hasattr(self.core, "packed")))

    def packed(
        self,
        meta_params: Params,
        params: Params,
        features: Tensor,
        state: CoreState,
        segments: Segments,
    ) -> tuple[Params, Params, CoreState, dict[str, Any]]:
        """:meth:`__call__` for m instances at once, the core run on their packed features
        (m, n, F) in ``segments``' layout (:mod:`selfref.net.packing`); ``params`` and the
        returned θ + Δθ and Δθ are per tensor, (m, *shape) each, and the metrics (m,)."""
        if not self.packs:
            raise ValueError(f"core {self.core.name!r} does not run packed (the lopt core does)")
        flat, state, metrics = self.core.packed(  # type: ignore[attr-defined]
            meta_params, features, state, segments
        )
        updates = segments.unpack(flat)
        new_params = {k: params[k] + updates[k] for k in params}
        metrics = dict(metrics)
        sq = (flat.detach().to(torch.float64) ** 2).sum(-1)
        metrics["update_norm"] = torch.sqrt(sq).to(flat.dtype)
        return new_params, updates, state, metrics
