"""The SRWM few-shot sequence learner (Irie et al. 2022, §4.1; reference ``ConvSRWMModel``).

Notation: b – sequences, n – length, i – input size, d – model width, w – ways.
"""

from __future__ import annotations

import torch
import torch.nn.functional as Fn
from torch import Tensor

from selfref.net.cores.srwm import SRWMLayerConfig, srwm_init, srwm_layer, srwm_stats
from selfref.net.sequence.base import linear, uniform
from selfref.params import Params

__all__ = ["SRWMSequenceModel"]


class SRWMSequenceModel:
    """Input projection → [SRWM layer, feed-forward block] × layers → output layer.

    Irie et al. 2022, section 4.1 and the reference ``ConvSRWMModel``: the SRWM layer is
    :func:`selfref.net.cores.srwm.srwm_layer` (output projection, LayerNorm residual, β per
    sub-matrix, softmax on q and k); the feed-forward block is ``h + W2 relu(W1 LN(h))``.

    Args:
        in_dim: input size i (projected features + ways).
        num_classes: w.
        dim: model width d (default 64).
        heads: SRWM heads (default 4, head dim d / heads).
        layers: number of [SRWM, FF] blocks (default 2).
        ff_dim: hidden size of the FF block (default 4·d).
        beta_init: mean of W^β's init (reference: 0).
        input_softmax: softmax over each head's input before the recurrence (the
            reference's ``use_input_softmax`` option; default off as there).
        fused: fused SRWM recurrence (default True; False runs the step-by-step reference).
        token_shift: an option beside the reference model (default off): the input
            projection also reads the previous step's input (zeros at t = 0), so the first
            layer sees x_{t−1} beside its label y_{t−1} — the "token shift" of RWKV-style
            models. The SRWM layers are unchanged.
    """

    name = "srwm"

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        dim: int = 64,
        heads: int = 4,
        layers: int = 2,
        ff_dim: int | None = None,
        beta_init: float = 0.0,
        fused: bool = True,
        token_shift: bool = False,
        input_softmax: bool = False,
    ) -> None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.in_dim, self.num_classes, self.dim, self.layers = in_dim, num_classes, dim, layers
        self.ff_dim = ff_dim or 4 * dim
        self.token_shift = token_shift
        self.proj_in = 2 * in_dim if token_shift else in_dim
        self.layer_config = SRWMLayerConfig(
            dim=dim, heads=heads, beta_init=beta_init, fused=fused, input_softmax=input_softmax
        )

    def init_params(self, generator: torch.Generator) -> Params:
        d, f = self.dim, self.ff_dim
        p: Params = {
            "in.weight": uniform(generator, self.proj_in, d, self.proj_in),
            "in.bias": uniform(generator, self.proj_in, d),
        }
        for i in range(self.layers):
            p.update(srwm_init(self.layer_config, generator, prefix=f"l{i}.srwm."))
            p[f"l{i}.ff.ln.weight"] = torch.ones(d)
            p[f"l{i}.ff.ln.bias"] = torch.zeros(d)
            p[f"l{i}.ff.1.weight"] = uniform(generator, d, f, d)
            p[f"l{i}.ff.1.bias"] = uniform(generator, d, f)
            p[f"l{i}.ff.2.weight"] = uniform(generator, f, d, f)
            p[f"l{i}.ff.2.bias"] = uniform(generator, f, d)
        p["out.weight"] = uniform(generator, d, self.num_classes, d)
        p["out.bias"] = uniform(generator, d, self.num_classes)
        return p

    def _run(
        self, params: Params, inputs: Tensor, state: dict[str, Tensor] | None
    ) -> tuple[Tensor, dict[str, Tensor], list[dict[str, Tensor]]]:
        new_state: dict[str, Tensor] = {}
        if self.token_shift:
            last = inputs.new_zeros(inputs[:, :1].shape) if state is None else state["last"]
            prev = torch.cat([last, inputs[:, :-1]], dim=1)  # (b, n, i): input at t − 1
            new_state["last"] = inputs[:, -1:]
            inputs = torch.cat([inputs, prev], dim=-1)  # (b, n, 2i)
        h = linear(params, "in", inputs)  # (b, n, d)
        auxes = []
        for i in range(self.layers):
            sub = None
            if state is not None:
                sub = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"l{i}/")}
            h, st, aux = srwm_layer(params, h, self.layer_config, sub, prefix=f"l{i}.srwm.")
            new_state.update({f"l{i}/{k}": v for k, v in st.items()})
            auxes.append(aux)
            u = Fn.layer_norm(
                h, (self.dim,), params[f"l{i}.ff.ln.weight"], params[f"l{i}.ff.ln.bias"]
            )
            h = h + linear(params, f"l{i}.ff.2", torch.relu(linear(params, f"l{i}.ff.1", u)))
        return linear(params, "out", h), new_state, auxes  # (b, n, w)

    def forward(
        self, params: Params, inputs: Tensor, state: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits (b, n, w); state = fast-weight shifts per layer (``l<i>/W_<M>``)."""
        logits, new_state, _ = self._run(params, inputs, state)
        return logits, new_state

    @torch.no_grad()
    def internals(self, params: Params, inputs: Tensor) -> dict[str, Tensor]:
        """``l<i>/dW/<M>``, ``l<i>/q_entropy``, ``l<i>/k_entropy``, ``l<i>/beta/<M>`` ..."""
        _, _, auxes = self._run(params, inputs, None)
        out = {}
        for i, aux in enumerate(auxes):
            out.update({f"l{i}/{k}": v for k, v in srwm_stats(aux).items()})
        return out
