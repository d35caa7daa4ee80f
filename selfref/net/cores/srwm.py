"""The self-referential weight matrix (SRWM) of Irie, Schlag, Csordás, Schmidhuber 2022.

"A Modern Self-Referential Weight Matrix That Learns to Modify Itself" (ICML 2022), section 3
(eq. 7–10). Per head, the layer owns W = {W^y, W^q, W^k ∈ R^{e×e}, W^β ∈ R^{4×e}} and, for
each input x_t of a sequence, computes with the weights *before* the update::

    y_t = W^y x_t                      (output)
    q_t = softmax(W^q x_t)             (query, a key into the matrix)
    k_t = softmax(W^k x_t)             (key)
    β_t = σ(W^β x_t)                   (one learning rate per sub-matrix M ∈ {y, q, k, β})
    for every sub-matrix M:  v = W^M q_t,  v̄ = W^M k_t,
                             W^M ← W^M + β_t[M] · (v − v̄) ⊗ k_t

so the matrix rewrites every one of its parts, including the parts that compute its own
keys, queries and learning rates. The layer around the recurrence follows the reference
model (IDSIA/modern-srwm, ``supervised_learning/layer.py``, ``SRWMlayer``): the input h
(b, n, d) is split into heads (optionally with a softmax over each head), the recurrence
runs per head, an output projection (no bias) maps the heads back to d, and the residual
is the layer-normalized input: ``out = LayerNorm(h) + W^o y``. Initialization as there:
W^y, W^q, W^k ~ N(0, 1/e), W^β ~ N(beta_init, 1/e).

What lives here:

- :func:`srwm_recurrence_reference` — a direct, step-by-step transcription of the equations,
  one sub-matrix at a time (the readable specification; tests compare against it).
- :func:`srwm_recurrence_fused` — the faster path: the four sub-matrices concatenated into
  one (3e+4)×e matrix, so each step is two batched matmuls (read x; read q and k together)
  and one rank-1 update. Same numbers up to float rounding.
- :func:`srwm_layer` / :class:`SRWMLayerConfig` — the full layer on (b, n, d) sequences,
  functional (``params`` dict in, ``(out, state, aux)`` out). The base weights are copied per
  sequence; with ``state`` (the shift of the fast weights from the base weights, as in the
  reference's stateful mode) the self-modifications carry on across calls.
- :class:`SRWMLayer` — a thin ``nn.Module`` over the same function, for use as a plain layer.
- :func:`srwm_stats` — internals for logging: |ΔW| per sub-matrix, β, entropy of q and k.
- :class:`SRWMCore` — the SRWM as the *modifying model* of ``SelfReferentialNet``: at every
  step it emits a modification of the normal model's weights and, through the same update
  rule, of its own fast weights (self-referential mode, see its docstring).

Pure PyTorch: runs on CPU and GPU, in any floating dtype.

Notation: b – batch (sequences), n – sequence length, h – heads, e – head dim,
d – model dim (= h·e), r – rows of the fused matrix (3e + 4), c – coordinates of a tensor,
F – per-coordinate feature size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as Fn
from einops import rearrange, repeat
from torch import Tensor, nn

from selfref.net.cores.base import as_dtype, build_config, check_feature_dim
from selfref.params import Params

__all__ = [
    "SUB_MATRICES",
    "SRWMLayerConfig",
    "srwm_init",
    "srwm_recurrence_reference",
    "srwm_recurrence_fused",
    "srwm_layer",
    "srwm_stats",
    "SRWMLayer",
    "SRWMCoreConfig",
    "SRWMCore",
]

SUB_MATRICES: tuple[str, ...] = ("y", "q", "k", "b")  # W^y, W^q, W^k, W^β (β stored as "b")

FastWeights = tuple[Tensor, Tensor, Tensor, Tensor]  # (W_y, W_q, W_k, W_b)


def _entropy(p: Tensor) -> Tensor:
    """Entropy (nats) of distributions along the last axis."""
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)


# --------------------------------------------------------------------------------------
# The recurrence
# --------------------------------------------------------------------------------------


def _beta_rows(beta: Tensor, e: int) -> Tensor:
    """(..., 4) rates -> (..., 3e + 4): each row of the fused matrix gets its M's rate."""
    return torch.cat(
        [
            repeat(beta[..., :3], "... m -> ... (m e)", e=e),
            repeat(beta[..., 3:], "... m -> ... (m e)", e=4),
        ],
        dim=-1,
    )


def _check_fast_weights(x: Tensor, w: FastWeights) -> None:
    W_y, W_q, W_k, W_b = w
    *lead, _, e = x.shape
    want = (*lead, e, e)
    for name, t in (("W_y", W_y), ("W_q", W_q), ("W_k", W_k)):
        if tuple(t.shape) != want:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; expected {want} for x {tuple(x.shape)}"
            )
    if tuple(W_b.shape) != (*lead, 4, e):
        raise ValueError(f"W_b has shape {tuple(W_b.shape)}; expected {(*lead, 4, e)}")


def srwm_recurrence_reference(
    x: Tensor, W_y: Tensor, W_q: Tensor, W_k: Tensor, W_b: Tensor
) -> tuple[Tensor, FastWeights, dict[str, Tensor]]:
    """The SRWM recurrence, step by step and sub-matrix by sub-matrix (the specification).

    Irie et al. 2022, section 3, eq. 7–10. Weights are (out, in): ``y = W x``.

    Args:
        x: inputs (b, h, n, e).
        W_y, W_q, W_k: fast weights at the start of the sequence, (b, h, e, e).
        W_b: β weights at the start, (b, h, 4, e); rows are the rates of W^y, W^q, W^k, W^β.

    Returns:
        ``(y, (W_y, W_q, W_k, W_b), aux)``: outputs (b, h, n, e) computed with the weights
        before each update; the weights after the last step; ``aux`` with ``q``, ``k``
        (b, h, n, e) and ``beta`` (b, h, n, 4) for logging.
    """
    _check_fast_weights(x, (W_y, W_q, W_k, W_b))
    ys, qs, ks, betas = [], [], [], []
    n = x.shape[-2]
    for t in range(n):
        xt = x[..., t, :]  # (b, h, e)
        y = torch.einsum("...ij,...j->...i", W_y, xt)  # (b, h, e)
        q = torch.softmax(torch.einsum("...ij,...j->...i", W_q, xt), dim=-1)  # (b, h, e)
        k = torch.softmax(torch.einsum("...ij,...j->...i", W_k, xt), dim=-1)  # (b, h, e)
        beta = torch.sigmoid(torch.einsum("...ij,...j->...i", W_b, xt))  # (b, h, 4)
        new = []
        for m, W in enumerate((W_y, W_q, W_k, W_b)):
            v = torch.einsum("...ij,...j->...i", W, q)  # (b, h, rows_M)
            v_bar = torch.einsum("...ij,...j->...i", W, k)  # (b, h, rows_M)
            delta = beta[..., m, None] * (v - v_bar)  # (b, h, rows_M)
            new.append(W + torch.einsum("...i,...j->...ij", delta, k))
        W_y, W_q, W_k, W_b = new
        ys.append(y)
        qs.append(q)
        ks.append(k)
        betas.append(beta)
    aux = {
        "q": torch.stack(qs, dim=-2),  # (b, h, n, e)
        "k": torch.stack(ks, dim=-2),  # (b, h, n, e)
        "beta": torch.stack(betas, dim=-2),  # (b, h, n, 4)
    }
    return torch.stack(ys, dim=-2), (W_y, W_q, W_k, W_b), aux


def srwm_recurrence_fused(
    x: Tensor, W_y: Tensor, W_q: Tensor, W_k: Tensor, W_b: Tensor
) -> tuple[Tensor, FastWeights, dict[str, Tensor]]:
    """The same recurrence with the four sub-matrices fused into one (3e+4)×e matrix.

    Per step: one matmul reads ``W x`` (y, q, k and β logits at once), one reads ``W [q k]``
    (v and v̄ of every sub-matrix at once), and one rank-1 update writes all rows, each row
    scaled by its sub-matrix's β. Arguments and returns as
    :func:`srwm_recurrence_reference`, which it matches up to float rounding.
    """
    _check_fast_weights(x, (W_y, W_q, W_k, W_b))
    e = x.shape[-1]
    W = torch.cat([W_y, W_q, W_k, W_b], dim=-2)  # (b, h, r, e), r = 3e + 4
    ys, qs, ks, betas = [], [], [], []
    for t in range(x.shape[-2]):
        xt = x[..., t, :]  # (b, h, e)
        out = torch.einsum("...ij,...j->...i", W, xt)  # (b, h, r)
        y, q_logit, k_logit, b_logit = torch.split(out, [e, e, e, 4], dim=-1)
        q = torch.softmax(q_logit, dim=-1)  # (b, h, e)
        k = torch.softmax(k_logit, dim=-1)  # (b, h, e)
        beta = torch.sigmoid(b_logit)  # (b, h, 4)
        qk = torch.stack([q, k], dim=-1)  # (b, h, e, 2)
        v = torch.matmul(W, qk)  # (b, h, r, 2): columns W q, W k
        beta_rows = _beta_rows(beta, e)  # (b, h, r)
        delta = beta_rows * (v[..., 0] - v[..., 1])  # (b, h, r)
        W = W + delta.unsqueeze(-1) * k.unsqueeze(-2)  # (b, h, r, e)
        ys.append(y)
        qs.append(q)
        ks.append(k)
        betas.append(beta)
    W_y, W_q, W_k, W_b = torch.split(W, [e, e, e, 4], dim=-2)
    aux = {
        "q": torch.stack(qs, dim=-2),
        "k": torch.stack(ks, dim=-2),
        "beta": torch.stack(betas, dim=-2),
    }
    return torch.stack(ys, dim=-2), (W_y, W_q, W_k, W_b), aux


# --------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SRWMLayerConfig:
    """One SRWM layer (Irie et al. 2022; reference ``SRWMlayer``)."""

    dim: int = 64  # d, width of the residual stream (= heads * head_dim)
    heads: int = 4  # h, independent self-referential matrices
    layer_norm: bool = True  # residual is LayerNorm(h) (reference use_ln=True); else h
    input_softmax: bool = False  # softmax over each head's input (reference option, off)
    beta_init: float = 0.0  # mean of W^β's init (reference few-shot models pass 0)
    fused: bool = True  # use the fused recurrence (same numbers, fewer ops)

    def __post_init__(self) -> None:
        if self.dim < 1 or self.heads < 1 or self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be a positive multiple of heads={self.heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


def srwm_init(
    config: SRWMLayerConfig,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    prefix: str = "",
) -> Params:
    """Fresh layer parameters, drawn on the CPU from ``generator``.

    Keys (with ``prefix``): ``W_y``, ``W_q``, ``W_k`` (h, e, e); ``W_b`` (h, 4, e);
    ``out`` (d, d) — the output projection, ``nn.Linear``'s default uniform init;
    ``ln.weight``, ``ln.bias`` (d,) when ``config.layer_norm``.
    """
    h, e, d = config.heads, config.head_dim, config.dim
    std = 1.0 / math.sqrt(e)

    def normal(*shape: int, mean: float = 0.0) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * std + mean

    p: Params = {
        "W_y": normal(h, e, e),
        "W_q": normal(h, e, e),
        "W_k": normal(h, e, e),
        "W_b": normal(h, 4, e, mean=config.beta_init),
        "out": (torch.rand(d, d, generator=generator, dtype=torch.float64) * 2 - 1) / math.sqrt(d),
    }
    if config.layer_norm:
        p["ln.weight"] = torch.ones(d, dtype=torch.float64)
        p["ln.bias"] = torch.zeros(d, dtype=torch.float64)
    return {prefix + k: v.to(device=device, dtype=dtype) for k, v in p.items()}


def srwm_layer(
    params: Params,
    h: Tensor,
    config: SRWMLayerConfig,
    state: dict[str, Tensor] | None = None,
    prefix: str = "",
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Apply one SRWM layer to a batch of sequences.

    Args:
        params: layer parameters (:func:`srwm_init`), keys under ``prefix``.
        h: input sequences (b, n, d).
        config: the layer's configuration.
        state: ``None`` — the base weights are copied for every sequence, so the
            self-modifications live within the sequence; or the shifts of the fast weights
            from the base weights (``{"W_y": (b, h, e, e), ..., "W_b": (b, h, 4, e)}``, as
            returned by a previous call) to carry them on (the reference's stateful mode).

    Returns:
        ``(out, state, aux)``: out (b, n, d); the new state (fast weights minus base weights,
        not detached — detach it yourself to truncate backpropagation); aux with ``q``,
        ``k`` (b, h, n, e), ``beta`` (b, h, n, 4) and ``dW_<M>`` (b, h) the Frobenius norm of
        each sub-matrix's change over this call (for :func:`srwm_stats`).
    """
    if h.dim() != 3 or h.shape[-1] != config.dim:
        raise ValueError(f"expected input (b, n, {config.dim}), got {tuple(h.shape)}")
    b = h.shape[0]
    x = rearrange(h, "b n (h e) -> b h n e", h=config.heads)
    if config.input_softmax:
        x = torch.softmax(x, dim=-1)
    base = [params[prefix + f"W_{m}"] for m in SUB_MATRICES]
    start = [repeat(w, "h i j -> b h i j", b=b) for w in base]
    if state is not None:
        start = [w + state[f"W_{m}"] for w, m in zip(start, SUB_MATRICES)]
    recur = srwm_recurrence_fused if config.fused else srwm_recurrence_reference
    y, final, aux = recur(x, *start)  # y: (b, h, n, e)
    y = rearrange(y, "b h n e -> b n (h e)")
    out = y @ params[prefix + "out"].T  # (b, n, d)
    if config.layer_norm:
        res = Fn.layer_norm(
            h, (config.dim,), params[prefix + "ln.weight"], params[prefix + "ln.bias"]
        )
    else:
        res = h
    new_state = {f"W_{m}": f - w for f, w, m in zip(final, base, SUB_MATRICES)}
    aux = dict(aux)
    for f, s, m in zip(final, start, SUB_MATRICES):
        aux[f"dW_{m}"] = torch.linalg.matrix_norm((f - s).detach())  # (b, h)
    return res + out, new_state, aux


def srwm_stats(aux: dict[str, Tensor]) -> dict[str, Tensor]:
    """Internals of one layer call for logging (all detached).

    Returns scalars ``dW/<M>`` (mean over sequences and heads of ‖ΔW^M‖_F over the call),
    ``q_entropy`` and ``k_entropy`` (mean entropy in nats; the maximum is log e),
    ``beta_mean/<M>``; and the tensors ``beta/<M>`` (all β values of sub-matrix M, for
    histograms).
    """
    out: dict[str, Tensor] = {}
    for m in SUB_MATRICES:
        if f"dW_{m}" in aux:
            out[f"dW/{m}"] = aux[f"dW_{m}"].detach().mean()
    out["q_entropy"] = _entropy(aux["q"].detach()).mean()
    out["k_entropy"] = _entropy(aux["k"].detach()).mean()
    beta = aux["beta"].detach()  # (..., 4)
    for i, m in enumerate(SUB_MATRICES):
        out[f"beta_mean/{m}"] = beta[..., i].mean()
        out[f"beta/{m}"] = beta[..., i].reshape(-1)
    return out


class SRWMLayer(nn.Module):
    """An SRWM layer as a plain ``nn.Module`` (parameters registered, same math).

    Example:
        >>> layer = SRWMLayer(SRWMLayerConfig(dim=8, heads=2), torch.Generator().manual_seed(0))
        >>> out, state = layer(torch.randn(3, 5, 8))
        >>> out.shape, state["W_y"].shape
        (torch.Size([3, 5, 8]), torch.Size([3, 2, 4, 4]))
    """

    def __init__(
        self,
        config: SRWMLayerConfig = SRWMLayerConfig(),
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.config = config
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        for k, v in srwm_init(config, gen, dtype).items():
            self.register_parameter(k.replace(".", "_"), nn.Parameter(v))

    def forward(
        self, h: Tensor, state: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        params: Params = {k.replace("ln_", "ln."): v for k, v in self.named_parameters()}
        out, new_state, _ = srwm_layer(params, h, self.config, state)
        return out, new_state


# --------------------------------------------------------------------------------------
# Self-referential mode: the SRWM as the modifying model's core
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SRWMCoreConfig:
    """The SRWM modifier core (self-referential mode)."""

    feature_dim: int = 2  # F: the analyzer's per-coordinate features (L2L log/sign: 2)
    dim: int = 16  # d, width of the SRWM that reads one coordinate
    heads: int = 2  # h
    output_scale: float = 0.1  # the update is output_scale * (linear readout), as L2L's 0.1
    beta_init: float = 0.0  # mean of W^β's init
    read_own_stats: bool = True  # append the fast weights' |ΔW^M| to every coordinate's input

    def __post_init__(self) -> None:
        for name in ("feature_dim", "dim", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"SRWM core {name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.heads:
            raise ValueError(f"SRWM core dim={self.dim} must be a multiple of heads={self.heads}")


class SRWMCore:
    """SRWM as the modifying model: it rewrites the normal model's weights and its own.

    Irie et al. 2022 (section 3) is a sequence model whose weight matrix modifies itself at
    every step. Here the sequence is the optimization trajectory: at step t, each coordinate
    i of a parameter tensor presents its feature vector (from the analyzing model, plus —
    with ``read_own_stats`` — the statistics ‖W^M − W^M_0‖ of this core's own fast weights)
    projected to d; one fast SRWM per parameter tensor, shared by the tensor's coordinates,
    reads all of them with the weights before the update, and

    - emits Δθ_i = output_scale · w_out · (LayerNorm(x_i) + W^o y_i) — the modification of
      the normal model (Schmidhuber 1993's "modifying model"), and
    - rewrites its own fast weights with the SRWM rule, averaged over the tensor's
      coordinates: W^M ← W^M + mean_i β_i[M] (W^M q_i − W^M k_i) ⊗ k_i — so the network
      modifies both the normal model's weights and its own at every step.

    With a single coordinate this is exactly one step of :func:`srwm_recurrence_reference`
    (tests check it). The fast weights start from the meta-learned base weights for every
    new optimization run (``init_state``); the state holds them explicitly, per tensor, as
    ``{"<name>/W_y": (h, e, e), ...}``. ``fast_weight_stats(meta_params, state)`` gives
    the per-tensor |ΔW^M|; the analyzing model reads them through ``state_stats`` with
    ``AnalyzerConfig(core_stats=4)`` (then ``read_own_stats``, the core's own shortcut to the
    same numbers, is switched off by ``SelfReferentialNet.from_task``).

    Meta-parameters: ``in.weight`` (d, F[+4]), ``in.bias`` (d), the SRWM layer's
    (``srwm.*``), ``head.weight`` (1, d), ``head.bias`` (1).

    Example:
        >>> core = SRWMCore(feature_dim=2)
        >>> phi = core.init_meta_params(torch.Generator().manual_seed(0))
        >>> theta = {"w": torch.zeros(3, 4)}
        >>> state = core.init_state(phi, theta)
        >>> upd, state, _ = core(phi, {"w": torch.zeros(3, 4, 2)}, state)
        >>> upd["w"].shape
        torch.Size([3, 4])
    """

    name: ClassVar[str] = "srwm"

    def __init__(self, config: SRWMCoreConfig | None = None, **options: Any) -> None:
        self.config = build_config(SRWMCoreConfig, config, options, "SRWM")
        base = self.config
        self.layer = SRWMLayerConfig(
            dim=base.dim, heads=base.heads, layer_norm=True, beta_init=base.beta_init
        )

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    @property
    def in_dim(self) -> int:
        return self.feature_dim + (4 if self.config.read_own_stats else 0)

    def init_meta_params(self, generator: torch.Generator) -> Params:
        d = self.config.dim
        bound = 1.0 / math.sqrt(self.in_dim)
        p: Params = {
            "in.weight": (torch.rand(d, self.in_dim, generator=generator) * 2 - 1) * bound,
            "in.bias": torch.zeros(d),
        }
        p.update(srwm_init(self.layer, generator, prefix="srwm."))
        p["head.weight"] = (torch.rand(1, d, generator=generator) * 2 - 1) / math.sqrt(d)
        p["head.bias"] = torch.zeros(1)
        return p

    def init_state(self, meta_params: Params, params: Params) -> dict[str, Tensor]:
        """Zero shifts: every tensor's fast weights start at the base weights W_0 (φ).

        The state holds the *shift* W − W_0, as the reference's stateful mode does, so the
        fast weights are W_0 + shift at every step and the meta-gradient reaches W_0 through
        the whole recurrence, however the trainer builds (or detaches) the initial state.
        """
        state: dict[str, Tensor] = {}
        for name in params:
            for m in SUB_MATRICES:
                state[f"{name}/W_{m}"] = torch.zeros_like(meta_params[f"srwm.W_{m}"])
        return state

    def state_stats(self, meta_params: Params, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """What the analyzing model reads of this core (``AnalyzerConfig(core_stats=4)``):
        :meth:`fast_weight_stats`."""
        return self.fast_weight_stats(meta_params, state)

    def fast_weight_stats(self, meta_params: Params, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """{tensor name: (4,)} — ‖W^M − W^M_0‖_F summed over heads, M in (y, q, k, β)."""
        names = sorted({k.rsplit("/", 1)[0] for k in state})
        out = {}
        for name in names:
            out[name] = torch.stack(
                [torch.linalg.matrix_norm(state[f"{name}/W_{m}"]).sum() for m in SUB_MATRICES]
            )
        return out

    def __call__(
        self, meta_params: Params, features: dict[str, Tensor], state: dict[str, Tensor]
    ) -> tuple[Params, dict[str, Tensor], dict[str, Any]]:
        cfg, lay = self.config, self.layer
        ref = next(iter(features.values()))
        meta_params = as_dtype(meta_params, ref.dtype)
        check_feature_dim(features, self.feature_dim)
        stats = self.fast_weight_stats(meta_params, state) if cfg.read_own_stats else {}
        updates: Params = {}
        new_state: dict[str, Tensor] = {}
        metrics: dict[str, Any] = {}
        dW_sum: dict[str, list[Tensor]] = {m: [] for m in SUB_MATRICES}
        W0 = torch.cat([meta_params[f"srwm.W_{m}"] for m in SUB_MATRICES], dim=-2)  # (h, r, e)
        betas, q_ent, k_ent = [], [], []
        for name, f in features.items():
            shape = f.shape[:-1]
            x = f.reshape(-1, self.feature_dim)  # (c, F)
            if cfg.read_own_stats:
                s = repeat(stats[name].to(x.dtype), "m -> c m", c=x.shape[0])
                x = torch.cat([x, s], dim=-1)  # (c, F + 4)
            x = x @ meta_params["in.weight"].T + meta_params["in.bias"]  # (c, d)
            xh = rearrange(x, "c (h e) -> h c e", h=lay.heads)  # (h, c, e)
            shift = torch.cat([state[f"{name}/W_{m}"] for m in SUB_MATRICES], dim=-2)
            W = W0 + shift  # (h, r, e): fast weights = base weights + self-modifications
            e = lay.head_dim
            read = torch.einsum("hrj,hcj->hcr", W, xh)  # (h, c, r)
            y, q_logit, k_logit, b_logit = torch.split(read, [e, e, e, 4], dim=-1)
            q = torch.softmax(q_logit, dim=-1)  # (h, c, e)
            k = torch.softmax(k_logit, dim=-1)  # (h, c, e)
            beta = torch.sigmoid(b_logit)  # (h, c, 4)
            v = torch.einsum("hrj,hcj->hcr", W, q - k)  # (h, c, r): W q − W k
            delta = _beta_rows(beta, e) * v  # (h, c, r)
            dW = torch.einsum("hcr,hcj->hrj", delta, k) / x.shape[0]  # (h, r, e)
            for m, part in zip(SUB_MATRICES, torch.split(shift + dW, [e, e, e, 4], dim=-2)):
                new_state[f"{name}/W_{m}"] = part
            for m, part in zip(SUB_MATRICES, torch.split(dW.detach(), [e, e, e, 4], dim=-2)):
                dW_sum[m].append(torch.linalg.matrix_norm(part).sum())
            y = rearrange(y, "h c e -> c (h e)")  # (c, d)
            out = y @ meta_params["srwm.out"].T  # (c, d)
            res = Fn.layer_norm(
                x, (lay.dim,), meta_params["srwm.ln.weight"], meta_params["srwm.ln.bias"]
            )
            z = res + out  # (c, d)
            upd = z @ meta_params["head.weight"].T + meta_params["head.bias"]  # (c, 1)
            updates[name] = (cfg.output_scale * upd).reshape(shape)
            betas.append(rearrange(beta.detach(), "h c m -> (h c) m"))
            q_ent.append(_entropy(q.detach()).mean())
            k_ent.append(_entropy(k.detach()).mean())
        # metrics stay (detached) tensors so the core also runs under torch.func.vmap
        if betas:
            for m in SUB_MATRICES:
                metrics[f"srwm/dW/{m}"] = torch.stack(dW_sum[m]).sum()
            beta_all = torch.cat(betas)  # (h·c over tensors, 4)
            for i, m in enumerate(SUB_MATRICES):
                metrics[f"srwm/beta_mean/{m}"] = beta_all[:, i].mean()
                metrics[f"srwm/beta/{m}"] = beta_all[:, i]  # all rates, for histograms
            metrics["srwm/q_entropy"] = torch.stack(q_ent).mean()
            metrics["srwm/k_entropy"] = torch.stack(k_ent).mean()
        return updates, new_state, metrics
