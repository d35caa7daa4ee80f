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

Notation: S – shape of one parameter tensor, F – features per coordinate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from selfref.params import Params

__all__ = ["AnalyzerConfig", "Analyzer", "log_sign_preprocess", "PREPROCESS"]

PREPROCESS: tuple[str, ...] = ("log_sign", "raw")


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

    @property
    def feature_dim(self) -> int:
        per = 2 if self.preprocess == "log_sign" else 1
        return per * (1 + len(self.momentum_decays)) + int(self.include_param) + self.core_stats


class Analyzer:
    """Builds the modifier's input {name: (*S, F)} from θ, ∇θQ and its own state.

    The state holds one momentum average per decay and parameter tensor, under the keys
    ``"m{i}|{name}"``; it is a plain dict of tensors, passed in and returned.
    """

    def __init__(self, config: AnalyzerConfig | None = None) -> None:
        self.config = config or AnalyzerConfig()

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def init_state(self, params: Params) -> dict[str, Tensor]:
        """Zero momentum averages (an empty dict when no decays are configured)."""
        return {
            f"m{i}|{k}": torch.zeros_like(v)
            for i in range(len(self.config.momentum_decays))
            for k, v in params.items()
        }

    def _pre(self, g: Tensor) -> Tensor:
        if self.config.preprocess == "log_sign":
            return log_sign_preprocess(g, self.config.p)  # (*S, 2)
        return g.unsqueeze(-1)  # (*S, 1)

    def __call__(
        self,
        params: Params,
        grads: Params,
        state: dict[str, Tensor],
        core_stats: dict[str, Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Features {name: (*S, F)} and the new analyzer state.

        ``core_stats`` ({name: (core_stats,)}, from the core's ``state_stats``) is required
        when ``config.core_stats`` > 0 and appended to every coordinate of that tensor.
        """
        cfg = self.config
        if cfg.core_stats and core_stats is None:
            raise ValueError(f"this analyzer reads {cfg.core_stats} core statistics; none given")
        new_state: dict[str, Tensor] = {}
        feats: dict[str, Tensor] = {}
        for k, g in grads.items():
            if cfg.normalize:
                g = g / (g.pow(2).mean().sqrt() + cfg.eps)
            parts = [self._pre(g)]
            for i, beta in enumerate(cfg.momentum_decays):
                m = beta * state[f"m{i}|{k}"] + (1.0 - beta) * g
                new_state[f"m{i}|{k}"] = m
                parts.append(self._pre(m))
            if cfg.include_param:
                parts.append(params[k].unsqueeze(-1))
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
