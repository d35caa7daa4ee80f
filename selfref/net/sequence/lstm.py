"""An LSTM sequence learner (Hochreiter, Younger, Conwell 2001; the reference ``ConvLSTMModel``).

Notation: b – sequences, n – length, i – input size, d – hidden size, w – ways.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfref.net.sequence.base import linear, uniform
from selfref.params import Params

__all__ = ["LSTMSequenceModel", "lstm_scan"]


def lstm_scan(gates_x: Tensor, w_hh: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """LSTM over precomputed input gates (b, n, 4d) (order i, f, g, o as torch's LSTM)."""
    hs = []
    for t in range(gates_x.shape[1]):
        g = gates_x[:, t] + h @ w_hh.T  # (b, 4d)
        i, f, gg, o = g.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        h = torch.sigmoid(o) * torch.tanh(c)
        hs.append(h)
    return torch.stack(hs, dim=1), h, c  # (b, n, d)


class LSTMSequenceModel:
    """One LSTM layer (hidden ``dim``) and a linear output layer; torch's LSTM init.

    Args:
        in_dim: input size i. num_classes: w. dim: hidden size (default 128).
    """

    name = "lstm"

    def __init__(self, in_dim: int, num_classes: int, dim: int = 128) -> None:
        self.in_dim, self.num_classes, self.dim = in_dim, num_classes, dim

    def init_params(self, generator: torch.Generator) -> Params:
        d = self.dim
        return {
            "lstm.w_ih": uniform(generator, d, 4 * d, self.in_dim),
            "lstm.w_hh": uniform(generator, d, 4 * d, d),
            "lstm.b": uniform(generator, d, 4 * d) + uniform(generator, d, 4 * d),
            "out.weight": uniform(generator, d, self.num_classes, d),
            "out.bias": uniform(generator, d, self.num_classes),
        }

    def forward(
        self, params: Params, inputs: Tensor, state: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        b = inputs.shape[0]
        if state is None:
            state = {
                "h": inputs.new_zeros(b, self.dim),
                "c": inputs.new_zeros(b, self.dim),
            }
        gx = inputs @ params["lstm.w_ih"].T + params["lstm.b"]  # (b, n, 4d)
        hs, h, c = lstm_scan(gx, params["lstm.w_hh"], state["h"], state["c"])
        return linear(params, "out", hs), {"h": h, "c": c}

    def internals(self, params: Params, inputs: Tensor) -> dict[str, Tensor]:
        return {}
