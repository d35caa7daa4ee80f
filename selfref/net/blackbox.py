"""The learned black-box optimizer's network: an LSTM that proposes the next query.

Chen et al. 2017, "Learning to learn without gradient descent by gradient descent" (ICML),
section 2, eq. 1: ``h_t, x_t = RNN_φ(h_{t−1}, x_{t−1}, y_{t−1})``. The network reads the
previous query x_{t−1} ∈ [0, 1]^d and its observed value y_{t−1} (d + 1 inputs; x_0 = y_0 = 0
before the first query), updates its state, and emits the next query x_t. Queries live in
the unit cube: a linear readout of the top layer squashed by a sigmoid (any search space is
mapped onto the cube, see :meth:`selfref.search_space.SearchSpace.from_unit`). The paper
compares LSTM and DNC cores; this is the LSTM one (stacked layers, gate order i, f, g, o as
``torch.nn.LSTM``, whose init it uses).

Functional, as the rest of ``selfref.net``: φ is a plain dict of tensors, the state an explicit
value, and :meth:`BlackBoxRNN.step` is pure, so meta-training backpropagates through a whole
optimization trajectory (:mod:`selfref.meta.problems.blackbox`) and ``torch.func.vmap`` can
run ES particles.

Notation: n – functions optimized at once, d – input dimension, H – hidden units, L – layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from selfref.net.sequence.base import uniform
from selfref.net.sequence.lstm import lstm_scan
from selfref.params import Params

__all__ = ["BlackBoxRNNConfig", "BlackBoxRNN"]


@dataclass(frozen=True)
class BlackBoxRNNConfig:
    """The proposer's shape (sized for CPU meta-training; the paper's sizes are not restated)."""

    dim: int = 2  # d, the black-box function's input dimension
    hidden: int = 64  # H, hidden units per LSTM layer
    layers: int = 2  # L, stacked LSTM layers

    def __post_init__(self) -> None:
        for name in ("dim", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"BlackBoxRNN {name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BlackBoxRNN:
    """LSTM proposer: (x_{t−1}, y_{t−1}, state) -> (x_t, state).

    Meta-parameters: ``l{i}.w_ih`` (4H, in), ``l{i}.w_hh`` (4H, H), ``l{i}.b`` (4H) per layer,
    ``out.weight`` (d, H), ``out.bias`` (d). State: ``h``, ``c`` of shape (n, L, H).

    Example:
        >>> net = BlackBoxRNN(BlackBoxRNNConfig(dim=3))
        >>> phi = net.init_params(torch.Generator().manual_seed(0))
        >>> state = net.init_state(4)
        >>> x, state = net.step(phi, state, torch.zeros(4, 3), torch.zeros(4))
        >>> x.shape, bool(((x > 0) & (x < 1)).all())
        (torch.Size([4, 3]), True)
    """

    name = "rnn-bo"

    def __init__(self, config: BlackBoxRNNConfig | None = None) -> None:
        self.config = config or BlackBoxRNNConfig()

    def init_params(self, generator: torch.Generator, dtype: torch.dtype = torch.float64) -> Params:
        """``torch.nn.LSTM``/``nn.Linear`` init U(−1/√H, 1/√H), drawn from ``generator``;
        the readout bias starts at 0, so the first query is the centre of the cube."""
        c = self.config
        h = c.hidden
        phi: Params = {}
        for i in range(c.layers):
            fan_in = c.dim + 1 if i == 0 else h
            phi[f"l{i}.w_ih"] = uniform(generator, h, 4 * h, fan_in)
            phi[f"l{i}.w_hh"] = uniform(generator, h, 4 * h, h)
            phi[f"l{i}.b"] = uniform(generator, h, 4 * h) + uniform(generator, h, 4 * h)
        phi["out.weight"] = uniform(generator, h, c.dim, h)
        phi["out.bias"] = torch.zeros(c.dim)
        return {k: v.to(dtype) for k, v in phi.items()}

    def init_state(
        self, n: int, dtype: torch.dtype = torch.float64, device: Any = None
    ) -> dict[str, Tensor]:
        """Zero hidden and cell states for n functions: h, c of shape (n, L, H)."""
        shape = (n, self.config.layers, self.config.hidden)
        return {
            "h": torch.zeros(shape, dtype=dtype, device=device),
            "c": torch.zeros(shape, dtype=dtype, device=device),
        }

    def step(
        self, params: Params, state: dict[str, Tensor], x_prev: Tensor, y_prev: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One proposal.

        Args:
            params: φ.
            state: ``h``, ``c`` (n, L, H).
            x_prev: (n, d) the previous query (zeros before the first).
            y_prev: (n,) its (normalized) observed value (zero before the first).

        Returns:
            x_t (n, d) in the open unit cube, and the new state.
        """
        inp = torch.cat([x_prev, y_prev.unsqueeze(-1)], dim=-1)  # (n, d + 1)
        hs, cs = [], []
        for i in range(self.config.layers):
            gx = inp @ params[f"l{i}.w_ih"].T + params[f"l{i}.b"]  # (n, 4H)
            _, h, c = lstm_scan(
                gx.unsqueeze(1), params[f"l{i}.w_hh"], state["h"][:, i], state["c"][:, i]
            )  # (n, H) each
            hs.append(h)
            cs.append(c)
            inp = h
        x = torch.sigmoid(inp @ params["out.weight"].T + params["out.bias"])  # (n, d)
        return x, {"h": torch.stack(hs, dim=1), "c": torch.stack(cs, dim=1)}
