"""Coordinatewise two-layer LSTM core (Andrychowicz et al. 2016, section 2.1 and 3).

"Learning to learn by gradient descent by gradient descent": a small LSTM, its weights φ
shared across all coordinates of the optimizee, runs once per coordinate; each coordinate
keeps its own hidden and cell state. The paper's setting is two layers of 20 hidden units
and a linear output; the output is scaled by 0.1 (our default ``output_scale``) to give Δθ.

All coordinates of all parameter tensors are processed as one (N, F) matrix, so a step is a
handful of matmuls however many tensors the normal model has.

Notation: N – coordinates (all parameter tensors, flattened in dict order), F – features,
L – layers, H – hidden units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import Tensor

from selfref.net.cores.base import CoreState, build_config
from selfref.params import Params

__all__ = ["LSTMConfig", "LSTMCore"]


@dataclass(frozen=True)
class LSTMConfig:
    """Paper defaults (Andrychowicz et al. 2016, section 3)."""

    feature_dim: int = 2  # F: the log/sign gradient preprocessing gives 2 features
    hidden: int = 20  # H: hidden units per layer
    layers: int = 2  # L: stacked LSTM layers
    output_scale: float = 0.1  # Δθ = output_scale · (linear readout of the top layer)
    forget_bias: float = 0.0  # added to the forget-gate bias at init (0 = plain init)

    def __post_init__(self) -> None:
        for name in ("feature_dim", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"LSTM {name} must be >= 1, got {getattr(self, name)}")


class LSTMCore:
    """Coordinatewise LSTM modifier: features (*S, F) -> Δθ (*S).

    Meta-parameters: ``l{i}.w_ih`` (4H, in), ``l{i}.w_hh`` (4H, H), ``l{i}.b`` (4H) for each
    layer (gate order i, f, g, o), ``out.w`` (1, H), ``out.b`` (1). State: ``h`` and ``c``,
    each (N, L, H).

    Example:
        >>> core = LSTMCore()
        >>> phi = core.init_meta_params(torch.Generator().manual_seed(0))
        >>> theta = {"w": torch.zeros(3, 4)}
        >>> state = core.init_state(phi, theta)
        >>> upd, state, _ = core(phi, {"w": torch.zeros(3, 4, 2)}, state)
        >>> upd["w"].shape
        torch.Size([3, 4])
    """

    name: ClassVar[str] = "lstm"

    def __init__(self, config: LSTMConfig | None = None, **options: Any) -> None:
        self.config = build_config(LSTMConfig, config, options, "LSTM")

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def init_meta_params(self, generator: torch.Generator) -> Params:
        """Uniform(−1/√H, 1/√H) weights, as ``torch.nn.LSTM``; drawn from ``generator``."""
        c = self.config
        bound = 1.0 / math.sqrt(c.hidden)

        def u(*shape: int) -> Tensor:
            return (torch.rand(*shape, generator=generator) * 2 - 1) * bound

        phi: Params = {}
        for i in range(c.layers):
            fan_in = c.feature_dim if i == 0 else c.hidden
            phi[f"l{i}.w_ih"] = u(4 * c.hidden, fan_in)
            phi[f"l{i}.w_hh"] = u(4 * c.hidden, c.hidden)
            b = u(4 * c.hidden)
            b[c.hidden : 2 * c.hidden] += c.forget_bias
            phi[f"l{i}.b"] = b
        phi["out.w"] = u(1, c.hidden)
        phi["out.b"] = u(1)
        return phi

    def init_state(self, meta_params: Params, params: Params) -> CoreState:
        """Zero hidden and cell states, one per coordinate: h, c of shape (N, L, H)."""
        n = sum(v.numel() for v in params.values())
        ref = next(iter(params.values()))
        shape = (n, self.config.layers, self.config.hidden)
        return {
            "h": torch.zeros(shape, dtype=ref.dtype, device=ref.device),
            "c": torch.zeros(shape, dtype=ref.dtype, device=ref.device),
        }

    def __call__(
        self, meta_params: Params, features: dict[str, Tensor], state: CoreState
    ) -> tuple[Params, CoreState, dict[str, Any]]:
        c = self.config
        names = list(features)
        flat = [rearrange(features[k], "... f -> (...) f") for k in names]  # [(n_k, F)]
        sizes = [f.shape[0] for f in flat]
        x = torch.cat(flat, dim=0)  # (N, F)
        h_all, c_all = state["h"], state["c"]  # (N, L, H)
        hs, cs = [], []
        for i in range(c.layers):
            w_ih = meta_params[f"l{i}.w_ih"].to(x.dtype)
            w_hh = meta_params[f"l{i}.w_hh"].to(x.dtype)
            b = meta_params[f"l{i}.b"].to(x.dtype)
            h, cell = h_all[:, i], c_all[:, i]  # (N, H)
            gates = x @ w_ih.T + h @ w_hh.T + b  # (N, 4H)
            gi, gf, gg, go = gates.chunk(4, dim=-1)  # 4 × (N, H)
            cell = torch.sigmoid(gf) * cell + torch.sigmoid(gi) * torch.tanh(gg)
            h = torch.sigmoid(go) * torch.tanh(cell)
            hs.append(h)
            cs.append(cell)
            x = h
        out = x @ meta_params["out.w"].to(x.dtype).T + meta_params["out.b"].to(x.dtype)  # (N, 1)
        delta = c.output_scale * out.squeeze(-1)  # (N,)
        updates: Params = {}
        for k, part in zip(names, delta.split(sizes)):
            updates[k] = part.reshape(features[k].shape[:-1])  # S
        new_state = {"h": torch.stack(hs, dim=1), "c": torch.stack(cs, dim=1)}  # (N, L, H)
        return updates, new_state, {}
