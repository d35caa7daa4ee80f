"""Hypernetwork modifier core: a per-tensor LSTM writes a per-coordinate MLP (VeLO-style).

Ha, Dai, Le 2016, "HyperNetworks": a hypernetwork G : Λ × R^u → R^n maps a context z to the
weights of another network. Metz et al. 2022, "VeLO: Training Versatile Learned Optimizers
by Scaling Up" (section 3, "hyper_v2"/VeLO architecture) give the learned-optimizer form
used here:

1. a small LSTM, its weights shared by all parameter tensors but with one state per tensor,
   reads per-tensor statistics of the analyzing model's features and emits a context vector
   z_T ∈ R^u for each tensor T;
2. a linear hypernetwork maps z_T to mixing coefficients α_T ∈ R^K over a bank of K weight
   sets of a tiny per-coordinate MLP: θ^MLP_T = Σ_k α_{T,k} θ^MLP_k (VeLO's "mixing over a
   bank of MLP weights");
3. that MLP reads each coordinate's features and emits (direction d, magnitude m); the step
   is Δθ = d · exp(exp_mult · m) · step_mult with VeLO's exp_mult = step_mult = 0.001.

Per-tensor statistics (the LSTM's input, 3F + 1 numbers): the mean, the mean absolute value
and the standard deviation over the tensor's coordinates of each of the F features, and
log(1 + numel)/10. Every reshape is an einops pattern.

The defaults are VeLO's setting (section 3, its step constants). Beside it, as options
measured in ``benchmarks/cores_quality.py``: a larger ``step_mult`` (0.1; VeLO's 0.001 assumes
far longer meta-training than a CPU budget), and, since VeLO's per-parameter MLP reads
momentum accumulators at several timescales among its inputs, momentum features — which in
this framework come from the analyzer (``AnalyzerConfig(momentum_decays=(0.5, 0.9, 0.99))``,
F = 8); the core reads any ``feature_dim``.

Metrics (detached tensors, also under ``torch.func.vmap``): ``hypernet/direction_mean``,
``direction_abs_mean``, ``direction_std``, ``magnitude_mean``, ``magnitude_std``,
``step_abs_mean``, ``alpha_norm`` (mean ‖α_T‖), all over every coordinate of every tensor.

Notation: T – parameter tensors, c – coordinates of one tensor, F – features per coordinate,
u – LSTM hidden size (context z), K – bank size, m – MLP hidden units, o – MLP outputs (2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from einops import rearrange, reduce
from torch import Tensor

from selfref.net.cores.base import CoreState, as_dtype, build_config, check_feature_dim
from selfref.params import Params

__all__ = ["HypernetConfig", "HypernetCore", "tensor_statistics"]


@dataclass(frozen=True)
class HypernetConfig:
    """VeLO-style hypernetwork core; VeLO's step constants are the defaults."""

    feature_dim: int = 2  # F: the analyzer's per-coordinate features (L2L log/sign: 2)
    hidden: int = 16  # u: per-tensor LSTM hidden size = context vector z (VeLO: 512)
    bank: int = 8  # K: MLP weight sets mixed by the hypernetwork
    mlp_hidden: int = 4  # m: hidden units of the per-coordinate MLP (VeLO: 4)
    exp_mult: float = 0.001  # VeLO: step = d · exp(exp_mult · m) · step_mult
    step_mult: float = 0.001  # VeLO's step multiplier

    def __post_init__(self) -> None:
        for name in ("feature_dim", "hidden", "bank", "mlp_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"hypernet core {name} must be >= 1, got {getattr(self, name)}")
        if not self.step_mult > 0:
            raise ValueError(f"step_mult must be > 0, got {self.step_mult}")

    @property
    def stats_dim(self) -> int:
        return 3 * self.feature_dim + 1

    @property
    def mlp_sizes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of one MLP weight set (per bank entry)."""
        return {
            "w1": (self.mlp_hidden, self.feature_dim),
            "b1": (self.mlp_hidden,),
            "w2": (2, self.mlp_hidden),
            "b2": (2,),
        }


def tensor_statistics(f: Tensor) -> Tensor:
    """Per-tensor statistics of features (*S, F) -> (3F + 1,): mean, mean |·|, std, log size."""
    flat = rearrange(f, "... F -> (...) F")  # (c, F)
    c = flat.shape[0]
    mean = reduce(flat, "c F -> F", "mean")
    absmean = reduce(flat.abs(), "c F -> F", "mean")
    std = (reduce((flat - mean) ** 2, "c F -> F", "mean") + 1e-12).sqrt()
    size = flat.new_full((1,), math.log1p(c) / 10.0)
    return torch.cat([mean, absmean, std, size])


class HypernetCore:
    """Per-tensor LSTM → hypernetwork → per-coordinate MLP (Ha et al. 2016; VeLO).

    Meta-parameters: ``lstm.w_ih`` (4u, 3F+1), ``lstm.w_hh`` (4u, u), ``lstm.b`` (4u); the
    hypernetwork ``mix.w`` (K, u), ``mix.b`` (K); the bank ``bank.w1`` (K, m, F),
    ``bank.b1`` (K, m), ``bank.w2`` (K, 2, m), ``bank.b2`` (K, 2). State: ``h``, ``c`` —
    (T, u), one LSTM state per parameter tensor, in the dict order of the parameters.

    Example:
        >>> core = HypernetCore()
        >>> phi = core.init_meta_params(torch.Generator().manual_seed(0))
        >>> theta = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}
        >>> state = core.init_state(phi, theta)
        >>> feats = {"w": torch.ones(3, 4, 2), "b": torch.ones(4, 2)}
        >>> upd, state, metrics = core(phi, feats, state)
        >>> upd["w"].shape, state["h"].shape
        (torch.Size([3, 4]), torch.Size([2, 16]))
    """

    name: ClassVar[str] = "hypernet"

    def __init__(self, config: HypernetConfig | None = None, **options: Any) -> None:
        self.config = build_config(HypernetConfig, config, options, "hypernet")

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def init_meta_params(self, generator: torch.Generator) -> Params:
        """LSTM and hypernetwork: U(±1/√fan_in) (``torch.nn`` defaults); bank: U(±1/√fan_in)
        per entry, so the mixed MLP starts at a random mixture of random MLPs."""
        c = self.config
        u, K, m, F = c.hidden, c.bank, c.mlp_hidden, c.feature_dim

        def unif(fan_in: int, *shape: int) -> Tensor:
            return (torch.rand(*shape, generator=generator) * 2 - 1) / math.sqrt(fan_in)

        return {
            "lstm.w_ih": unif(u, 4 * u, c.stats_dim),
            "lstm.w_hh": unif(u, 4 * u, u),
            "lstm.b": unif(u, 4 * u),
            "mix.w": unif(u, K, u),
            "mix.b": unif(u, K),
            "bank.w1": unif(F, K, m, F),
            "bank.b1": unif(F, K, m),
            "bank.w2": unif(m, K, 2, m),
            "bank.b2": unif(m, K, 2),
        }

    def init_state(self, meta_params: Params, params: Params) -> CoreState:
        """Zero LSTM state per parameter tensor: h, c of shape (T, u)."""
        ref = next(iter(params.values()))
        shape = (len(params), self.config.hidden)
        return {
            "h": torch.zeros(shape, dtype=ref.dtype, device=ref.device),
            "c": torch.zeros(shape, dtype=ref.dtype, device=ref.device),
        }

    def __call__(
        self, meta_params: Params, features: dict[str, Tensor], state: CoreState
    ) -> tuple[Params, CoreState, dict[str, Any]]:
        cfg = self.config
        names = list(features)
        ref = features[names[0]]
        phi = as_dtype(meta_params, ref.dtype)
        check_feature_dim(features, cfg.feature_dim)
        if state["h"].shape[-2] != len(names):
            raise ValueError(
                f"core state holds {state['h'].shape[-2]} tensors, features name {len(names)}"
            )
        # 1. per-tensor LSTM over statistics -> context z
        s = torch.stack([tensor_statistics(features[k]) for k in names])  # (T, 3F+1)
        gates = s @ phi["lstm.w_ih"].T + state["h"] @ phi["lstm.w_hh"].T + phi["lstm.b"]
        gi, gf, gg, go = rearrange(gates, "T (g u) -> g T u", g=4)
        cell = torch.sigmoid(gf) * state["c"] + torch.sigmoid(gi) * torch.tanh(gg)
        z = torch.sigmoid(go) * torch.tanh(cell)  # (T, u)
        # 2. hypernetwork: z -> mixing coefficients over the bank -> one MLP per tensor
        alpha = z @ phi["mix.w"].T + phi["mix.b"]  # (T, K)
        w1 = torch.einsum("TK,Kmf->Tmf", alpha, phi["bank.w1"])  # (T, m, F)
        b1 = torch.einsum("TK,Km->Tm", alpha, phi["bank.b1"])  # (T, m)
        w2 = torch.einsum("TK,Kom->Tom", alpha, phi["bank.w2"])  # (T, 2, m)
        b2 = torch.einsum("TK,Ko->To", alpha, phi["bank.b2"])  # (T, 2)
        # 3. per-coordinate MLP -> (direction, magnitude) -> step
        updates: Params = {}
        dirs, mags, steps = [], [], []
        for t, k in enumerate(names):
            f = rearrange(features[k], "... F -> (...) F")  # (c, F)
            hid = torch.relu(torch.einsum("mf,cf->cm", w1[t], f) + b1[t])  # (c, m)
            out = torch.einsum("om,cm->co", w2[t], hid) + b2[t]  # (c, 2)
            direction, magnitude = out.unbind(-1)  # (c,), (c,)
            step = direction * torch.exp(cfg.exp_mult * magnitude) * cfg.step_mult  # (c,)
            updates[k] = step.reshape(features[k].shape[:-1])
            dirs.append(direction.detach())
            mags.append(magnitude.detach())
            steps.append(step.detach())
        d, mg, st = torch.cat(dirs), torch.cat(mags), torch.cat(steps)
        metrics = {
            "hypernet/direction_mean": d.mean(),
            "hypernet/direction_abs_mean": d.abs().mean(),
            "hypernet/direction_std": d.std(correction=0),
            "hypernet/magnitude_mean": mg.mean(),
            "hypernet/magnitude_std": mg.std(correction=0),
            "hypernet/step_abs_mean": st.abs().mean(),
            "hypernet/alpha_norm": alpha.detach().norm(dim=-1).mean(),
        }
        return updates, {"h": z, "c": cell}, metrics
