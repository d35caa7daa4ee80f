"""The *analyzing* model: per-coordinate features of θ, ∇θQ and their history.

The default is the gradient preprocessing of Andrychowicz et al. 2016, "Learning to learn by
gradient descent by gradient descent", section 3.2 and appendix A, with p = 10::

    g  ->  (log|g| / p, sign g)   if |g| >= e^-p
           (-1, e^p · g)          otherwise

Options (off by default, beside the paper's setting): the same preprocessing of momentum
averages of g at several decays (their averages are the analyzer's state), the parameter
value itself, per-tensor normalization of g by its root mean square before preprocessing, and
``core_stats``: statistics of the modifying core's own state, per parameter tensor (for the
SRWM core, ‖W^M − W^M_0‖ of each of its four self-modified sub-matrices), appended to every
coordinate's features — the analyzing model reading the modifier's self-modifications.

Features for learned optimizers that generalize (off by default; VeLO, Metz et al. 2022,
section 3, and Metz et al. 2020, "Tasks, stability, architecture, and compute", section
3.2, read the same kinds of inputs):

- ``second_moment_decay`` β₂ > 0: a second-moment average v of g is kept, and g and every
  momentum are bias-corrected and divided by √v̂ + ε (Adam's normalization, Kingma & Ba
  2015, Algorithm 1), so the features are invariant to the scale of the loss;
  ``second_moment_feature`` adds log(√v̂ / mean over the tensor of √v̂), each coordinate's
  gradient scale relative to its tensor's;
- ``progress``: training progress, the fraction t / T of the horizon done (clipped at 1);
  the horizon is given to :meth:`Analyzer.init_state`, the step count t is the state;
- ``loss_features``: five numbers from the training loss L and the held-out loss H that
  the evaluation model measures (``context`` of :meth:`Analyzer.__call__`), smoothed as
  averages of log L and log H on two timescales (T/50 and T/10 steps, at least 2 and 5;
  horizon-relative, so they mean the same at any horizon): log(L̄_fast / L₀) (progress on
  the training loss), log(L̄_fast / L̄_slow) (its trend), log(H̄_fast / L̄_fast) (the
  generalization gap), log(H̄_fast / H̄_slow) (the held-out trend; rising = overfitting)
  and whether a held-out loss has been seen (without one the two held-out features are 0).
  They are clipped to fixed ranges; with ``squash_loss_features`` each is instead passed
  through tanh (log L̄/L₀ over 3, the trends over 3 after the × 5, the gap over 2), so a run
  far longer or cleaner than any seen in meta-training (a training loss near 0, a large
  generalization gap) reads values inside the range meta-training covered rather than
  beyond it.

With ``heldout_grad_feature`` the last column is ∇θ of the held-out minibatch's loss, raw,
on the steps the evaluation model measured it (``EvaluationConfig(heldout_grad=True)``;
``context["heldout_grad"]``) and 0 on the others. It is there for per-tensor statistics (the
``lopt`` core's held-out decay reads its cosine with θ); a core that fed it to a
per-coordinate rule would train on the validation split.

The per-tensor and global features (progress, losses) are broadcast to every coordinate.
:attr:`AnalyzerConfig.feature_names` names the columns in order.

Notation: S – shape of one parameter tensor, F – features per coordinate, T – horizon.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from selfref.net.packing import Segments
from selfref.params import Params

__all__ = ["AnalyzerConfig", "Analyzer", "log_sign_preprocess", "PREPROCESS", "LOSS_FEATURES"]

PREPROCESS: tuple[str, ...] = ("log_sign", "raw")
LOSS_FEATURES: tuple[str, ...] = (
    "loss_progress",
    "loss_trend",
    "heldout_gap",
    "heldout_trend",
    "heldout_seen",
)


def log_sign_preprocess(g: Tensor, p: float = 10.0) -> Tensor:
    """Andrychowicz et al. 2016, appendix A: (*S) -> (*S, 2).

    ``(log|g|/p, sign g)`` where ``|g| >= e^-p``, else ``(-1, e^p g)``. The log is taken of
    ``max(|g|, e^-p)`` so the unused branch never produces inf (nor a NaN gradient when the
    analyzer keeps second derivatives).
    """
    small = g.abs() < math.exp(-p)
    log_part = torch.log(g.abs().clamp_min(math.exp(-p))) / p
    first = torch.where(small, torch.full_like(g, -1.0), log_part)
    second = torch.where(small, math.exp(p) * g, torch.sign(g))
    return torch.stack([first, second], dim=-1)  # (*S, 2)


def _tensor_mean(x: Tensor, segments: Segments | None) -> Tensor:
    """The mean of ``x`` over its parameter tensor: over all of ``x`` (0-d), or with
    ``segments`` over each packed tensor's coordinates, spread back to them."""
    return x.mean() if segments is None else segments.spread(segments.mean(x))


@dataclass(frozen=True)
class AnalyzerConfig:
    """What the modifier sees for each coordinate."""

    preprocess: str = "log_sign"  # Andrychowicz et al. appendix A; "raw" feeds g itself
    p: float = 10.0  # the preprocessing's p (paper: 10)
    momentum_decays: tuple[float, ...] = ()  # extra features: preprocessed EMAs of g
    include_param: bool = False  # add θ itself as a feature
    normalize: bool = False  # divide each gradient tensor by its RMS before preprocessing
    eps: float = 1e-12  # floor of the RMS in per-tensor normalization
    core_stats: int = 0  # per-tensor statistics of the core's state appended (SRWM: 4)
    second_moment_decay: float = 0.0  # β₂ of an Adam-style normalization (0 = off)
    adam_eps: float = 1e-8  # ε of that normalization: g / (√v̂ + ε)
    second_moment_feature: bool = False  # add log(√v̂ / tensor mean √v̂) (needs β₂ > 0)
    progress: bool = False  # add t / T, the fraction of the horizon done
    loss_features: bool = False  # add the five LOSS_FEATURES (train and held-out loss)
    squash_loss_features: bool = False  # tanh-bound them instead of clipping (see above)
    heldout_grad_feature: bool = False  # add ∇θ of the held-out loss (0 when not measured)

    def __post_init__(self) -> None:
        if self.preprocess not in PREPROCESS:
            raise ValueError(
                f"unknown preprocess {self.preprocess!r}; valid: {', '.join(PREPROCESS)}"
            )
        if not self.p > 0:
            raise ValueError(f"preprocessing p must be > 0, got {self.p}")
        for b in self.momentum_decays:
            if not 0.0 <= b < 1.0:
                raise ValueError(f"momentum decay {b} must be in [0, 1)")
        if self.core_stats < 0:
            raise ValueError(f"core_stats must be >= 0, got {self.core_stats}")
        if not 0.0 <= self.second_moment_decay < 1.0:
            raise ValueError(
                f"second_moment_decay must be in [0, 1), got {self.second_moment_decay}"
            )
        if self.second_moment_feature and not self.second_moment_decay:
            raise ValueError("second_moment_feature needs second_moment_decay > 0")
        if not self.adam_eps > 0:
            raise ValueError(f"adam_eps must be > 0, got {self.adam_eps}")
        if self.squash_loss_features and not self.loss_features:
            raise ValueError("squash_loss_features needs loss_features")

    @property
    def reads_context(self) -> bool:
        """Whether the analyzer reads the evaluation model's measurements (``context``)."""
        return self.loss_features or self.heldout_grad_feature

    @property
    def needs_horizon(self) -> bool:
        """Whether :meth:`Analyzer.init_state` needs the horizon (progress, loss features)."""
        return self.progress or self.loss_features

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The name of every feature column, in order (F of them)."""
        pre = ("log", "sign") if self.preprocess == "log_sign" else ("value",)
        names = [f"grad.{p}" for p in pre]
        for b in self.momentum_decays:
            names += [f"momentum{b:g}.{p}" for p in pre]
        if self.second_moment_feature:
            names.append("second_moment")
        if self.include_param:
            names.append("param")
        if self.progress:
            names.append("progress")
        if self.loss_features:
            names += list(LOSS_FEATURES)
        if self.heldout_grad_feature:
            names.append("heldout_grad")
        names += [f"core_stat{i}" for i in range(self.core_stats)]
        return tuple(names)

    @property
    def feature_dim(self) -> int:
        return len(self.feature_names)


# averages behind the loss features: log L₀, log L̄ fast/slow, log H̄ fast/slow, seen flags
_LOSS_STATE: tuple[str, ...] = ("first", "fast", "slow", "seen", "h_fast", "h_slow", "h_seen")


class Analyzer:
    """Builds the modifier's input {name: (*S, F)} from θ, ∇θQ and its own state.

    The state holds one momentum average per decay and parameter tensor, under the keys
    ``"m{i}|{name}"``; with the options above also ``"v|{name}"`` (second moments), ``"t"``
    (steps taken), ``"horizon"`` and the ``"loss/*"`` averages. It is a plain dict of
    tensors, passed in and returned.
    """

    def __init__(self, config: AnalyzerConfig | None = None) -> None:
        self.config = config or AnalyzerConfig()

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def init_state(self, params: Params, horizon: int | None = None) -> dict[str, Tensor]:
        """Zero averages (an empty dict when no option keeps state).

        Args:
            params: the parameters the features will describe.
            horizon: T, the steps the run will take; required with ``progress`` or
                ``loss_features``.
        """
        cfg = self.config
        state = {
            f"m{i}|{k}": torch.zeros_like(v)
            for i in range(len(cfg.momentum_decays))
            for k, v in params.items()
        }
        if cfg.second_moment_decay:
            state.update({f"v|{k}": torch.zeros_like(v) for k, v in params.items()})
        ref = next(iter(params.values()))
        if cfg.second_moment_decay or cfg.needs_horizon:
            state["t"] = torch.zeros((), dtype=ref.dtype, device=ref.device)
        if cfg.needs_horizon:
            if horizon is None or horizon < 1:
                raise ValueError(
                    f"this analyzer reads training progress or losses; give the horizon "
                    f"(steps of the run, >= 1), got {horizon!r}"
                )
            state["horizon"] = torch.full((), float(horizon), dtype=ref.dtype, device=ref.device)
        if cfg.loss_features:
            for key in _LOSS_STATE:
                state[f"loss/{key}"] = torch.zeros((), dtype=ref.dtype, device=ref.device)
        return state

    def _pre(self, g: Tensor) -> Tensor:
        if self.config.preprocess == "log_sign":
            return log_sign_preprocess(g, self.config.p)  # (*S, 2)
        return g.unsqueeze(-1)  # (*S, 1)

    def _global_features(
        self, state: dict[str, Tensor], context: dict[str, Any] | None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Progress and loss features (0-d each) and the new progress/loss state."""
        cfg = self.config
        out: list[Tensor] = []
        new: dict[str, Tensor] = {}
        if not cfg.needs_horizon:
            return out, new
        t, horizon = state["t"], state["horizon"]
        if cfg.progress:
            out.append((t / horizon).clamp(0.0, 1.0))
        if cfg.loss_features:
            ctx = context or {}
            fast = 1.0 / (horizon / 50.0).clamp_min(2.0)  # 1 − β of the T/50 (≥ 2) average
            slow = 1.0 / (horizon / 10.0).clamp_min(5.0)  # 1 − β of the T/10 (≥ 5) average
            old = {key: state[f"loss/{key}"] for key in _LOSS_STATE}
            cur = dict(old)
            for prefix, name in (("", "loss"), ("h_", "heldout_loss")):
                if name not in ctx:
                    continue
                raw = ctx[name].detach().to(t.dtype).reshape(t.shape)
                ok = torch.isfinite(raw)
                log_l = torch.log(torch.where(ok, raw, torch.ones_like(raw)).clamp_min(1e-12))
                seen = old[f"{prefix}seen"] > 0
                for key, rate in (("fast", fast), ("slow", slow)):
                    prev = old[f"{prefix}{key}"]
                    avg = torch.where(seen, prev + rate * (log_l - prev), log_l)
                    cur[f"{prefix}{key}"] = torch.where(ok, avg, prev)
                if prefix == "":
                    cur["first"] = torch.where(seen | ~ok, old["first"], log_l)
                cur[f"{prefix}seen"] = torch.where(ok, torch.ones_like(raw), old[f"{prefix}seen"])
            seen_l, seen_h = cur["seen"], cur["h_seen"]
            progress = cur["fast"] - cur["first"]
            trend = 5.0 * (cur["fast"] - cur["slow"])
            gap = cur["h_fast"] - cur["fast"]
            h_trend = 5.0 * (cur["h_fast"] - cur["h_slow"])
            if cfg.squash_loss_features:
                vals = [
                    torch.tanh(progress / 3.0),
                    torch.tanh(trend / 3.0),
                    torch.tanh(gap / 2.0),
                    torch.tanh(h_trend / 3.0),
                ]
            else:
                vals = [
                    progress.clamp(-10.0, 2.0) / 5.0,
                    trend.clamp(-3.0, 3.0),
                    gap.clamp(-2.0, 5.0) / 2.0,
                    h_trend.clamp(-3.0, 3.0),
                ]
            out += [seen_l * vals[0], seen_l * vals[1], seen_h * seen_l * vals[2], seen_h * vals[3]]
            out.append(seen_h)
            new.update({f"loss/{key}": v for key, v in cur.items()})
        return out, new

    def __call__(
        self,
        params: Params,
        grads: Params,
        state: dict[str, Tensor],
        core_stats: dict[str, Tensor] | None = None,
        context: dict[str, Any] | None = None,
        segments: Segments | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Features {name: (*S, F)} and the new analyzer state.

        Args:
            params, grads: θ and ∇θQ.
            state: from :meth:`init_state` or the previous call.
            core_stats: ({name: (core_stats,)}, from the core's ``state_stats``) required
                when ``config.core_stats`` > 0 and appended to every coordinate of that
                tensor.
            context: the evaluation model's measurements at θ (0-d tensors): ``"loss"``,
                the training minibatch loss, and ``"heldout_loss"`` when a held-out
                minibatch was measured; read with ``loss_features`` (a missing one leaves
                its averages as they are); ``"heldout_grad"`` ({name: (*S,)}, ∇θ of the
                held-out loss) read with ``heldout_grad_feature``.
            segments: the layout of packed tensors (:mod:`selfref.net.packing`): then
                ``params``, ``grads``, the state and ``context["heldout_grad"]`` each hold
                the packed vectors (m, n) of m instances under
                :data:`~selfref.net.packing.PACKED` (the state from :meth:`init_state` of
                the packed params, its scalars (m, 1); the context's losses (m,)), the
                features are (m, n, F), and the per-tensor statistics (``normalize``'s RMS,
                ``second_moment_feature``'s mean) are taken per segment. Not with
                ``core_stats``.
        """
        cfg = self.config
        if segments is not None and cfg.core_stats:
            raise ValueError("an analyzer that reads core statistics does not run packed")
        if cfg.core_stats and core_stats is None:
            raise ValueError(f"this analyzer reads {cfg.core_stats} core statistics; none given")
        new_state: dict[str, Tensor] = {}
        feats: dict[str, Tensor] = {}
        beta2 = cfg.second_moment_decay
        if beta2 or cfg.needs_horizon:
            t1 = state["t"] + 1.0  # this step's 1-based count (bias correction)
            new_state["t"] = t1
        if cfg.needs_horizon:
            new_state["horizon"] = state["horizon"]
        glob, glob_state = self._global_features(state, context)
        new_state.update(glob_state)
        for k, g in grads.items():
            if cfg.normalize:
                g = g / (_tensor_mean(g.pow(2), segments).sqrt() + cfg.eps)
            scale = None
            if beta2:
                v = beta2 * state[f"v|{k}"] + (1.0 - beta2) * g * g
                new_state[f"v|{k}"] = v
                root = torch.sqrt(v / (1.0 - beta2**t1))  # √v̂
                scale = 1.0 / (root + cfg.adam_eps)
            parts = [self._pre(g if scale is None else g * scale)]
            for i, beta in enumerate(cfg.momentum_decays):
                m = beta * state[f"m{i}|{k}"] + (1.0 - beta) * g
                new_state[f"m{i}|{k}"] = m
                if scale is not None:
                    m = m / (1.0 - beta**t1) * scale  # bias-corrected, normalized
                parts.append(self._pre(m))
            if cfg.second_moment_feature:
                mean = _tensor_mean(root, segments)
                rel = torch.log((root + cfg.adam_eps) / (mean + cfg.adam_eps))
                parts.append(rel.clamp(-10.0, 10.0).unsqueeze(-1))
            if cfg.include_param:
                parts.append(params[k].unsqueeze(-1))
            if glob and segments is not None:  # one (m, n, G) block (copies: the same values)
                block = torch.stack(glob, dim=-1).to(g.dtype)  # (m, 1, G)
                parts.append(block.expand(*g.shape, len(glob)))
            elif glob:
                parts += [x.to(g.dtype).expand(g.shape).unsqueeze(-1) for x in glob]
            if cfg.heldout_grad_feature:
                held = (context or {}).get("heldout_grad")
                hg = torch.zeros_like(g) if held is None else held[k].to(g.dtype)
                parts.append(hg.unsqueeze(-1))
            if cfg.core_stats:
                assert core_stats is not None
                st = core_stats[k].to(g.dtype)
                if st.shape != (cfg.core_stats,):
                    raise ValueError(
                        f"core statistics of {k!r} have shape {tuple(st.shape)}; "
                        f"expected ({cfg.core_stats},)"
                    )
                parts.append(st.expand(*g.shape, cfg.core_stats))  # (*S, core_stats)
            feats[k] = torch.cat(parts, dim=-1)  # (*S, F)
        return feats, new_state
