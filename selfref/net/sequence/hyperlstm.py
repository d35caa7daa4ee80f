"""The HyperLSTM sequence learner (Ha, Dai, Le 2016, section 3.2).

Notation: b – sequences, n – length, i – input size, d – main hidden size, g – gates (4),
z – hyper-embedding size, w – ways.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from selfref.net.sequence.base import linear, uniform
from selfref.params import Params

__all__ = ["HyperLSTMSequenceModel"]


class HyperLSTMSequenceModel:
    """HyperLSTM (Ha, Dai, Le 2016, section 3.2) and a linear output layer.

    The hyper-LSTM (hidden ``hyper_dim``) reads [x_t, h_{t−1}]; its output ĥ_t gives the
    embeddings z^h, z^x, z^b (``embed`` each, per gate); a linear hypernetwork maps them to
    d^h = 1 + W^{hz} z^h, d^x = 1 + W^{xz} z^x (per-unit scalings) and b = b_0 + W^{bz} z^b,
    and the main LSTM's gates are d^h ⊙ (W^h h_{t−1}) + d^x ⊙ (W^x x_t) + b. (The paper
    writes d = W z; the "1 +" keeps the main LSTM a plain LSTM at initialization, as its
    recommended init of W^{hz} to 0 and the z-bias to 1 does.)

    Args:
        in_dim: input size i. num_classes: w. dim: main hidden size (default 112).
        hyper_dim: hyper-LSTM hidden size (default 32). embed: z size per gate (default 4).
    """

    name = "hyperlstm"

    def __init__(
        self, in_dim: int, num_classes: int, dim: int = 112, hyper_dim: int = 32, embed: int = 4
    ) -> None:
        self.in_dim, self.num_classes = in_dim, num_classes
        self.dim, self.hyper_dim, self.embed = dim, hyper_dim, embed

    def init_params(self, generator: torch.Generator) -> Params:
        d, hd, z, i = self.dim, self.hyper_dim, self.embed, self.in_dim
        return {
            "hyper.w_ih": uniform(generator, hd, 4 * hd, i + d),
            "hyper.w_hh": uniform(generator, hd, 4 * hd, hd),
            "hyper.b": uniform(generator, hd, 4 * hd),
            "z.weight": uniform(generator, hd, 3 * 4 * z, hd),  # ĥ -> (z^h, z^x, z^b) per gate
            "z.bias": torch.zeros(3 * 4 * z),
            "d.h": torch.zeros(4, d, z),  # W^{hz}: z^h -> scaling of W^h h, per gate
            "d.x": torch.zeros(4, d, z),  # W^{xz}
            "d.b": torch.zeros(4, d, z),  # W^{bz}
            "main.w_ih": uniform(generator, d, 4 * d, i),
            "main.w_hh": uniform(generator, d, 4 * d, d),
            "main.b": uniform(generator, d, 4 * d),
            "out.weight": uniform(generator, d, self.num_classes, d),
            "out.bias": uniform(generator, d, self.num_classes),
        }

    def _run(
        self, params: Params, inputs: Tensor, state: dict[str, Tensor] | None
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        b, n, _ = inputs.shape
        d, hd = self.dim, self.hyper_dim
        if state is None:
            z0 = inputs.new_zeros
            state = {"h": z0(b, d), "c": z0(b, d), "hh": z0(b, hd), "hc": z0(b, hd)}
        h, c, hh, hc = state["h"], state["c"], state["hh"], state["hc"]
        wx = inputs @ params["main.w_ih"].T  # (b, n, 4d)
        hx = inputs @ params["hyper.w_ih"][:, : self.in_dim].T + params["hyper.b"]  # (b, n, 4hd)
        hs, scales = [], []
        for t in range(n):
            hg = (
                hx[:, t]
                + h @ params["hyper.w_ih"][:, self.in_dim :].T
                + hh @ params["hyper.w_hh"].T
            )
            hi, hf, hgg, ho = hg.chunk(4, dim=-1)
            hc = torch.sigmoid(hf) * hc + torch.sigmoid(hi) * torch.tanh(hgg)
            hh = torch.sigmoid(ho) * torch.tanh(hc)  # (b, hd)
            zs = rearrange(linear(params, "z", hh), "b (s g z) -> s b g z", s=3, g=4)
            dh = 1 + torch.einsum("bgz,gdz->bgd", zs[0], params["d.h"])  # (b, 4, d)
            dx = 1 + torch.einsum("bgz,gdz->bgd", zs[1], params["d.x"])  # (b, 4, d)
            bias = torch.einsum("bgz,gdz->bgd", zs[2], params["d.b"])  # (b, 4, d)
            rec = rearrange(h @ params["main.w_hh"].T, "b (g d) -> b g d", g=4)
            inp = rearrange(wx[:, t], "b (g d) -> b g d", g=4)
            g = dh * rec + dx * inp + bias + rearrange(params["main.b"], "(g d) -> g d", g=4)
            i, f, gg, o = g.unbind(1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
            h = torch.sigmoid(o) * torch.tanh(c)
            hs.append(h)
            scales.append(torch.stack([dh, dx]).detach())
        new_state = {"h": h, "c": c, "hh": hh, "hc": hc}
        return linear(params, "out", torch.stack(hs, dim=1)), new_state, torch.stack(scales)

    def forward(
        self, params: Params, inputs: Tensor, state: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        logits, new_state, _ = self._run(params, inputs, state)
        return logits, new_state

    @torch.no_grad()
    def internals(self, params: Params, inputs: Tensor) -> dict[str, Tensor]:
        """``hyper/scale_h``, ``hyper/scale_x`` (all d^h, d^x values, for histograms)."""
        _, _, scales = self._run(params, inputs, None)  # (n, 2, b, 4, d)
        return {
            "hyper/scale_h": scales[:, 0].reshape(-1),
            "hyper/scale_x": scales[:, 1].reshape(-1),
        }
