"""A learned optimizer designed to generalize: a learned step on Adam's normalized direction.

The lessons of the learned optimizers that transfer to unseen tasks — VeLO (Metz et al.
2022, section 3: a per-tensor network conditions a per-parameter MLP that emits a direction
and a log-magnitude), Metz et al. 2020 ("Tasks, stability, architecture, and compute",
section 3.2: features normalized by second moments, training progress and validation loss
as inputs) and μLO/Celo (updates in a normalized, Adam-like space with a learned magnitude)
— put together so that the untrained core *is* Adam and meta-training only moves away from
it where that helps:

1. per tensor T, a controller MLP reads statistics of its coordinates' features (the mean,
   the mean absolute value, and the mean product with the base direction of every feature
   — that is, how gradients and momenta at each timescale agree — together with
   log(numel) and log10 RMS(θ_T)) and emits a context vector c_T, an immediate log step
   offset and a rate ρ_T at which a per-tensor accumulated offset A_T moves
   (A_T ← clip(A_T + ``adapt_rate`` · tanh ρ_T), the core's state: online learning-rate
   adaptation, as hypergradient descent or the "bold driver" adapt a step size, but learned);
   a_T, the bounded sum of both, is the tensor's log step offset. The global features
   (training progress, train/held-out losses) reach it as means, so it learns a schedule
   and reacts to overfitting;
2. per coordinate i, an MLP reads the coordinate's features (θ divided by RMS(θ_T)) and c_T
   and emits a bounded direction correction d_i and a bounded log-magnitude s_i;
3. the step is Δθ_i = −exp(log α + a_T + s_i) · (b_i + d_i), where b_i is Adam's direction
   m̂_i / (√v̂_i + ε) (the analyzer's feature ``base_index``) and log α a learned scalar.
   With ``base_index=-1`` (an analyzer without normalized momenta) b_i = 0 and the learned
   direction d_i is the whole step, as in VeLO.
4. optionally (``step_scale="mup"`` or ``"mup_up"``), a fixed factor per tensor, μP's
   learning-rate rule for Adam (base_fan_in / fan_in on hidden and output weights; see
   :class:`LoptConfig`), meant to carry the steps learned on the meta-training widths to
   other widths (off in the shipped optimizer: selection rounds 21 and 21c, README);
5. optionally (``decay_index``), a decoupled weight decay per tensor whose rate follows the
   held-out loss's hypergradient (see :class:`LoptConfig`): the one place where the
   validation split the optimizer reads at run time acts on the weights, as one number per
   tensor — as a tuned baseline's search reads it to choose a few numbers;
6. optionally (``heldout_step_rate``), the same held-out hypergradient rule for the step:
   a per-tensor log offset H_T that grows while a longer last step would have lowered the
   held-out loss and falls once it would have raised it (on in the shipped optimizer since
   selection round 22, as a config edit of its meta-trained φ; five variants beside it,
   ``heldout_step_horizon``, ``heldout_step_signal = "consistency"``,
   ``heldout_step_gate``, ``heldout_step_shrink`` and ``heldout_step_init``, are off, and so
   is ``train_step_rate``, which moves H_T by the training gradient's hypergradient at every
   step; see :class:`LoptConfig`);
7. optionally (``heldout_dir_rate``), the same rule for the direction correction: a
   per-tensor log gain D_T ≤ 0 on d_i that falls while the correction's part of the last
   step raised the held-out loss and returns while it lowered it (off: round 26's design
   runs; see :class:`LoptConfig`).

The last layer of both MLPs starts small (U(±``out_init``/√fan_in); with ``out_init=0`` at
zero, so that before meta-training Δθ is exactly Adam's update with learning rate
``lr_init`` and A_T stays 0). Guards: a_T, s_i and d_i pass
through scaled tanh
(|a_T| ≤ ``max_log_offset``, |s_i| ≤ ``max_log_mag``, |d_i| ≤ ``max_dir``), non-finite
steps are zeroed, non-finite features read as 0 (±10⁴ for ±inf) so one bad coordinate
cannot spoil its tensor's statistics, and every coordinate's step is clipped to
±``max_update``.

The core needs an analyzer with ``second_moment_decay`` > 0, ``preprocess="raw"`` and a
momentum of the decay it uses as the base (``AnalyzerConfig.feature_names`` gives the
indices; :func:`lopt_analyzer` builds the configuration this core was designed with). Its
own state is A_T (with ``adapt_horizon`` also the last progress value, with the decay its
log offsets Ω_T, with ``decay_horizon`` the decay's own last progress value, with the held-out
step rule H_T and the last step, with the direction rule D_T and the last step's correction
part; the analyzer keeps the averages).

Metrics (detached): ``lopt/log_step_mean`` (mean of log α + a_T + s_i), ``lopt/offset_mean``
(mean a_T, with ``step_scale`` plus its log factor), ``lopt/adapt_mean`` (mean A_T),
``lopt/dir_abs_mean`` (mean |d_i|), ``lopt/step_abs_mean`` (mean |Δθ_i|), with the decay
``lopt/log_decay_mean`` (mean log λ_T), with the held-out step rule ``lopt/heldout_step_mean``
(mean H_T), with the direction rule ``lopt/heldout_dir_mean`` (mean D_T).

Notation: T – parameter tensors, c – coordinates of one tensor, F – features per
coordinate, H – coordinate-MLP hidden units, U – controller hidden units (context size).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import Any, ClassVar

import torch
from einops import rearrange, reduce
from torch import Tensor

from selfref.net.cores.base import CoreState, as_dtype, build_config, check_feature_dim
from selfref.net.packing import PACKED, Segments
from selfref.params import Params

__all__ = ["LoptConfig", "LoptCore", "lopt_analyzer", "mup_log_scales"]


def lopt_analyzer(**overrides: Any) -> Any:
    """The :class:`~selfref.net.analyzing.AnalyzerConfig` the ``lopt`` core is designed for.

    Features: g, momenta at decays 0.5, 0.9, 0.99 and 0.999, all normalized by √v̂ with
    β₂ = 0.999 (Adam's), the relative second moment, θ, training progress and the five
    loss features. ``overrides`` replace any of these.
    """
    from selfref.net.analyzing import AnalyzerConfig

    opts: dict[str, Any] = {
        "preprocess": "raw",
        "momentum_decays": (0.5, 0.9, 0.99, 0.999),
        "second_moment_decay": 0.999,
        "second_moment_feature": True,
        "include_param": True,
        "progress": True,
        "loss_features": True,
    }
    opts.update(overrides)
    return AnalyzerConfig(**opts)


@dataclass(frozen=True)
class LoptConfig:
    """The ``lopt`` core; the defaults index the features of :func:`lopt_analyzer`."""

    feature_dim: int = 13  # F (lopt_analyzer(): 13)
    base_index: int = 2  # feature column of the base direction (momentum 0.9 / √v̂; -1: none)
    param_index: int = 6  # feature column of θ itself (-1: the analyzer gives none)
    hidden: int = 32  # H, hidden units of the per-coordinate MLP (two layers)
    ctrl_hidden: int = 16  # U, hidden units of the per-tensor controller (two layers)
    lr_init: float = 3e-3  # α before meta-training (Adam's step size)
    max_log_offset: float = 4.0  # |a_T| bound (per-tensor log step offset)
    adapt_rate: float = 0.05  # most A_T moves per step (log units; 0: the controller never does)
    max_log_mag: float = 2.0  # |s_i| bound (per-coordinate log-magnitude)
    max_dir: float = 1.0  # |d_i| bound (per-coordinate direction correction)
    max_update: float = 1.0  # |Δθ_i| clip, a last guard against blow-ups
    out_init: float = 1e-3  # output layers start U(±out_init/√fan_in) (0: exactly Adam)
    # The controller also reads cos(g_t, Δθ_{t-1}) per tensor, the sign of the hypergradient
    # of the loss with respect to the log step size (Baydin et al. 2018, section 2): near -1
    # while steps are too small to turn the gradient, near 0 or above once they are not.
    hyper_feature: bool = False
    # With hyper_rate > 0, A_T also follows hypergradient descent on the log step size:
    # A_T ← A_T + adapt_rate · tanh ρ_T − κ · cos(g_t, Δθ_{t-1}), the multiplicative form of
    # Baydin et al. 2018 (section 3.1, for Adam's step; here the cosine in log space, so the
    # rule is scale-free). κ is a meta-parameter (``hyper.log_rate``) starting at hyper_rate:
    # the steps grow while successive gradients agree with the last step and shrink when
    # they turn against it — a prior for reaching step sizes far from lr_init.
    hyper_rate: float = 0.0
    # With backoff_rate > 0, A_T also falls while the training loss rises: A_T ← A_T −
    # γ · relu(r), r the analyzer's ``loss_trend`` feature (column ``trend_index``: 5 ×
    # log of the fast over the slow average of the training loss), γ a meta-parameter
    # (``backoff.log_rate``) starting at backoff_rate — the "bold driver" rule (Battiti 1989:
    # cut the step when the loss goes up) in log space. A guard for nets the distribution
    # never had: large steps that kill a deep ReLU net raise the loss for many steps before
    # it sits at chance, and no gradient-agreement signal sees it.
    backoff_rate: float = 0.0
    trend_index: int = 9  # feature column of the training-loss trend (lopt_analyzer(): 9)
    # With dir_gate, the controller also emits a per-tensor gate g_T = 2·sigmoid(w·c_T + b)
    # ∈ (0, 2) on the direction correction: Δθ_i = −exp(log α + a_T + s_i)·(b_i + g_T·d_i).
    # Meta-parameters ``gate.w`` (U,) and ``gate.b`` (1,), starting at 0 (g_T = 1, the core
    # without the gate). Lets a tensor whose statistics say the correction hurts (the
    # held-out ablation found it both wins and loses, benchmarks/lopt_ablation.py) damp it.
    dir_gate: bool = False
    # With adapt_horizon = T_ref > 0, A_T moves by adapt_rate · T_ref / T per step instead of
    # adapt_rate (T the run's horizon, read as the step of the analyzer's progress feature,
    # column ``progress_index``): the offset accumulates per unit of training progress, so a
    # run 10× longer than any in meta-training sweeps the same range of offsets over its
    # course instead of 10× more (the shipped per-step rule anneals a 1,800-step digits run to
    # its floor by step 800). Past the horizon (progress clipped at 1) A_T stays.
    adapt_horizon: int = 0
    progress_index: int = 7  # feature column of t / T (lopt_analyzer(): 7)
    # With decay_index >= 0 (the column of the analyzer's ``heldout_grad`` feature, ∇θ of a
    # held-out minibatch's loss on the steps that read one), a decoupled weight decay per
    # tensor, Δθ_i −= exp(log α + a_T) · λ_T · θ_i (AdamW's form, Loshchilov & Hutter 2019,
    # Algorithm 2, with the tensor's step), whose log rate follows the held-out loss's
    # hypergradient: each read moves Ω_T by κ · cos(∇θ L_val, θ_T) — the derivative of the
    # held-out loss after a decay step with respect to log λ_T, −α λ_T ⟨∇θ L_val, θ_T⟩, up to
    # its positive scale — so the decay grows while shrinking the tensor would lower the
    # held-out loss and falls while it would raise it (the T1–T2 rule of Luketina et al.
    # 2016, section 2, online, per tensor, in log space); λ_T = exp(log λ₀ + Ω_T) within
    # [decay_min, decay_max]. κ (``decay.log_rate``) and λ₀ (``decay.log_init``) are
    # meta-parameters starting at decay_rate and decay_init. Nothing else reads the column:
    # it is zeroed before the coordinate MLP and the controller's statistics, so the
    # held-out split sets one number per tensor and never a direction.
    decay_index: int = -1
    decay_init: float = 1e-2  # λ₀ before meta-training
    decay_rate: float = 0.3  # κ before meta-training (log units per held-out read)
    decay_min: float = 1e-4  # λ_T bounds
    decay_max: float = 10.0
    # With decay_horizon = T_ref > 0, each held-out read moves Ω_T by κ · min(1, T_ref / T) ·
    # cos instead of κ · cos (T the run's horizon, read from the progress feature's step
    # 1 / T as with adapt_horizon; the first read, before any step of progress, moves at
    # κ): a run makes T / heldout_every reads, so without it a run 5× longer than any in
    # meta-training drives Ω_T 5× as far — to its clamp, λ_T at decay_min or decay_max on
    # most tensors of the 5× selection tasks. With it the decay moves over a run as over a
    # T_ref-step run, and never faster than meta-training's reads did (runs of T ≤ T_ref
    # move exactly as without it). Past the horizon (progress clipped at 1) Ω_T stays.
    decay_horizon: int = 0
    # With decay_gate, the decay may grow (Ω_T rise) only while the loss features show
    # overfitting; it may always fall. The greedy rule above is one step long: it raises
    # λ_T whenever shrinking θ_T would lower the next held-out minibatch's loss, which is as
    # true of a net that still fits (both losses fall together) or collapses under the decay
    # (both rise) as of one that overfits — the ablation of the shipped optimizer
    # (benchmarks/lopt_ablation.py) traced three of its held-out losses to a decay that grew
    # on nets that had not fit. The gate borrows the signal of early stopping (Prechelt
    # 1998, "Early stopping — but when?", section 2: the validation error rising while the
    # training error still falls) as a condition on growth, in the form the analyzer's
    # smoothed trends give it (not Prechelt's criteria themselves):
    # "gap"     — the generalization gap log(H̄ / L̄) widens: held-out trend > training trend;
    # "overfit" — the held-out loss rises while the training loss does not: held-out
    #             trend > 0 >= training trend.
    # "none" (the default) is the rule above. Both trends are read from the loss features
    # (``trend_index``, ``heldout_trend_index``), squashed alike, so their order is the raw
    # trends' order. No meta-parameter is added: a gate applies to a meta-trained φ as is.
    decay_gate: str = "none"
    heldout_trend_index: int = 11  # feature column of the held-out trend (lopt_analyzer(): 11)
    # With step_scale = "mup", each tensor's step (and its decoupled decay, which moves
    # with the step) is multiplied by base_fan_in / fan_in on every matrix-like tensor but
    # the first: the learning-rate rule of the Maximal Update Parametrization for Adam
    # (Yang et al. 2022, "Tensor Programs V", Table 3: hidden and output weights ∝ 1/fan_in;
    # input weights and every vector-like tensor, the biases, unscaled), which μLO (Thérien
    # et al. 2024, section 4) applies to a learned optimizer's update so that what it learns
    # on narrow nets transfers to wider and narrower ones. Here the optimizee keeps its own
    # initialization (μLO also μ-parameterizes the optimizee; an optimizer handed any
    # ``nn.Module`` cannot), so this is μP's step rule alone. A tensor's role is read from
    # its shape and order: fan_in = numel / shape[0] of a tensor of two or more dimensions,
    # and the first such tensor in parameter order is the input layer (the order in which
    # ``nn.Sequential`` and ``named_parameters`` list an MLP's or a conv net's layers).
    # base_fan_in is the width at which the scale is 1: by default the geometric middle of
    # the meta-training distribution's widths (8–64, log-uniform), so that a φ meta-trained
    # without the scale sees its steps change least. "mup_up" (an option beside the rule,
    # not μP): the factor only where it is above 1, max(1, base_fan_in / fan_in), so layers
    # narrower than the base take larger steps and wider ones keep theirs. "none" (the
    # default): no scale.
    step_scale: str = "none"
    base_fan_in: float = 22.6
    # With heldout_step_rate = κ_s > 0, each tensor's log step also follows the held-out
    # loss's hypergradient with respect to the size of the tensor's last step: at each read
    # (the steps where the ``decay_index`` column, ∇θ of a held-out minibatch's loss at θ_t,
    # is nonzero) H_T ← clip(H_T − κ_s · cos(∇θ L_val(θ_t), Δθ_{t−1,T}), ±heldout_step_max).
    # ∇θ L_val(θ_t) · Δθ_{t−1} is the derivative of the held-out loss after the last step
    # with respect to that step's log size, so H_T grows while a longer step would have
    # lowered the held-out loss (the net still fits what generalizes) and falls once it
    # would have raised it (the step overshoots, or fits what does not generalize). It is
    # the multiplicative hypergradient rule of Baydin et al. 2018 (section 3.1, the cosine
    # in log space as with ``hyper_rate``), computed on held-out data as the T1–T2 rule of
    # Luketina et al. 2016 (section 2) computes it for regularizers — the rule the decay
    # above follows, applied to the step. H_T joins the tensor's log offset outside a_T's
    # bound (so it scales the decoupled decay with the step). κ_s is a fixed option, not a
    # meta-parameter: the rule applies to a meta-trained φ as is. The held-out split again
    # sets one number per tensor, never a direction.
    heldout_step_rate: float = 0.0
    heldout_step_max: float = 4.0
    # heldout_step_init: H_T's value before the first read (0 by default). Below 0 the run
    # starts with a step e^{init} times the learned one and the rule raises it read by read
    # while longer steps lower the held-out loss: a warm-up that the held-out split ends.
    # 0 in the shipped optimizer: round 27's design runs (experiments/rounds/round27.md).
    heldout_step_init: float = 0.0
    # With heldout_step_horizon = T_ref > 0, each read moves H_T by κ_s · min(1, T_ref / T)
    # · cos instead (T the run's horizon, read from the progress feature as with
    # ``decay_horizon``): H_T moves over any run as far as over a T_ref-step one, so a run
    # 10× longer than meta-training's does not make 10× the moves; runs of T ≤ T_ref are
    # unchanged bit for bit.
    heldout_step_horizon: int = 0
    # heldout_step_signal: what a read contributes. "cos" (the rule above): cos(∇θ L_val,
    # Δθ_{t−1}); on a tensor of n coordinates a minibatch's noise holds it near O(1/√n) even
    # when its sign is consistent, so H_T of wide layers barely moves. "consistency" (an
    # option beside it): the sign consistency of the hypergradient over recent reads, r_T /
    # m_T, with r_T and m_T the averages (decay ``heldout_step_beta`` per read) of d_T =
    # ⟨∇θ L_val, Δθ_{t−1}⟩ and of |d_T| — near ±1 while the reads agree, near 0 while they
    # are noise, whatever the tensor's size.
    heldout_step_signal: str = "cos"
    heldout_step_beta: float = 0.9
    # With heldout_step_gate, H_T may grow only while the loss features do not show
    # overfitting; it may always fall: ``decay_gate``'s two conditions, the other way round
    # ("gap": no growth while the held-out trend is above the training trend; "overfit": no
    # growth while the held-out loss rises and the training loss does not). A read's cosine
    # is a minibatch's one-step view, and on a net that fits its training set the minibatch
    # mostly holds examples it already classifies, whose gradient still asks for a longer
    # step, while the held-out loss's mean, carried by a few examples it gets wrong, rises:
    # wine's logistic regression at 10x the horizon reads 0.035 val loss (A: 0.005) and 2x
    # tuned Adam's test loss under the rule. The smoothed held-out trend sees the mean.
    # "none" (the default): the rule above. No meta-parameter is added. Off in the shipped
    # optimizer: selection round 23 found "gap" holds the step down on digits, whose
    # held-out loss falls more slowly than its training loss (experiments/rounds/round23.md).
    heldout_step_gate: str = "none"
    # heldout_step_shrink = ρ ∈ [0, 1]: a read that would shrink the step (a move of H_T
    # below 0) moves it ρ times as far; growth is unchanged. The one-step hypergradient above
    # holds the curvature term Δθᵀ H Δθ of the step's own minibatch noise, which is always
    # positive, so on noisy problems it asks for a shorter step than the best one over the
    # run (the short-horizon bias of Wu et al. 2018). With ρ < 1, H_T settles where a longer
    # step hurts 1/ρ times as often as it helps, above the greedy rule's equilibrium. 1 (the
    # default): the rule above, bit for bit. Off in the shipped optimizer: selection round 24
    # found ρ = 0.7 behind on both parts of the score (experiments/rounds/round24.md).
    heldout_step_shrink: float = 1.0
    # With train_step_rate = κ_t > 0 (it needs heldout_step_rate > 0, whose H_T it moves),
    # H_T also follows the *training* minibatch's hypergradient at every step: H_T −= κ_t ·
    # cos(g_t, Δθ_{t−1,T}), the multiplicative rule of Baydin et al. 2018 (section 3.1, the
    # cosine in log space) on the gradient the step already computed, beside the held-out
    # reads (every ``heldout_every`` steps). A read-free signal five times as frequent: on a
    # plateau, where successive gradients keep agreeing with the last step, it lengthens the
    # step read by read, and the held-out rule still shortens it once longer steps raise the
    # held-out loss. κ_t is a fixed option, not a meta-parameter: a config edit of a
    # meta-trained φ. 0 (the default): off, bit for bit. Round 39 (experiments/rounds/round39.md).
    train_step_rate: float = 0.0
    # With heldout_dir_rate = κ_d > 0, the same held-out hypergradient rule scales the
    # learned direction correction per tensor: Δθ_i = −exp(log α + a_T + s_i)·(b_i +
    # e^{D_T}·d_i), and at each read D_T ← clip(D_T − κ_d · cos(∇θ L_val(θ_t), Δθ^d_{t−1,T}),
    # −heldout_dir_max, 0), where Δθ^d = −exp(log α + a_T + s_i)·e^{D_T}·d_i is the
    # correction's part of the last step — its derivative with respect to D_T, so the
    # cosine's sign is that of ∂L_val(θ_t)/∂D_T (Baydin et al. 2018, section 3.1, in log
    # space; on held-out data as Luketina et al. 2016, section 2). The correction shrinks on
    # a tensor while it raises the held-out loss and returns (never above its meta-trained
    # size, D_T ≤ 0) while it lowers it. The meta-trained d_i carries the shipped
    # optimizer's largest wins (benchmarks/lopt_ablation.py) and, on a 3-layer softplus net
    # outside the distribution, holds the run on a plateau that Adam's direction leaves.
    # A fixed option, not a meta-parameter; 0 (the default): off, bit for bit. Off in the
    # shipped optimizer: round 26's design runs (experiments/rounds/round26.md).
    heldout_dir_rate: float = 0.0
    heldout_dir_max: float = 4.0

    DECAY_GATES: ClassVar[tuple[str, ...]] = ("none", "gap", "overfit")
    STEP_SCALES: ClassVar[tuple[str, ...]] = ("none", "mup", "mup_up")
    STEP_SIGNALS: ClassVar[tuple[str, ...]] = ("cos", "consistency")

    def __post_init__(self) -> None:
        for name in ("feature_dim", "hidden", "ctrl_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"lopt core {name} must be >= 1, got {getattr(self, name)}")
        if not -1 <= self.base_index < self.feature_dim:
            raise ValueError(
                f"base_index {self.base_index} must be -1 or index one of {self.feature_dim} "
                "features"
            )
        if not -1 <= self.param_index < self.feature_dim or (
            self.param_index == self.base_index >= 0
        ):
            raise ValueError(
                f"param_index {self.param_index} must be -1 or another of "
                f"{self.feature_dim} features"
            )
        for name in ("lr_init", "max_log_offset", "max_log_mag", "max_dir", "max_update"):
            if not getattr(self, name) > 0:
                raise ValueError(f"lopt core {name} must be > 0, got {getattr(self, name)}")
        if not self.adapt_rate >= 0:
            raise ValueError(f"lopt core adapt_rate must be >= 0, got {self.adapt_rate}")
        if self.out_init < 0:
            raise ValueError(f"lopt core out_init must be >= 0, got {self.out_init}")
        if self.hyper_rate < 0:
            raise ValueError(f"lopt core hyper_rate must be >= 0, got {self.hyper_rate}")
        if self.backoff_rate < 0:
            raise ValueError(f"lopt core backoff_rate must be >= 0, got {self.backoff_rate}")
        if self.decay_index >= 0:
            if not self.decay_index < self.feature_dim or self.decay_index in (
                self.base_index,
                self.param_index,
            ):
                raise ValueError(
                    f"decay_index {self.decay_index} must name one of {self.feature_dim} "
                    "features other than the base direction and θ"
                )
            if self.param_index < 0:
                raise ValueError("the held-out decay needs θ among the features (param_index)")
            if not 0 < self.decay_min <= self.decay_init <= self.decay_max:
                raise ValueError(
                    f"want 0 < decay_min <= decay_init <= decay_max, got {self.decay_min}, "
                    f"{self.decay_init}, {self.decay_max}"
                )
            if not self.decay_rate > 0:
                raise ValueError(f"lopt core decay_rate must be > 0, got {self.decay_rate}")
        if self.adapt_horizon < 0:
            raise ValueError(f"lopt core adapt_horizon must be >= 0, got {self.adapt_horizon}")
        if self.decay_horizon < 0:
            raise ValueError(f"lopt core decay_horizon must be >= 0, got {self.decay_horizon}")
        if self.decay_horizon > 0 and (
            self.decay_index < 0 or not 0 <= self.progress_index < self.feature_dim
        ):
            raise ValueError(
                "decay_horizon needs the held-out decay (decay_index) and progress_index to "
                f"name one of {self.feature_dim} features"
            )
        if self.decay_gate not in self.DECAY_GATES:
            raise ValueError(
                f"lopt core decay_gate must be one of {self.DECAY_GATES}, got {self.decay_gate!r}"
            )
        if self.decay_gate != "none" and (self.decay_index < 0 or not self._names_trends()):
            raise ValueError(
                f"decay_gate {self.decay_gate!r} needs the held-out decay (decay_index) and "
                f"trend_index and heldout_trend_index to name one of {self.feature_dim} features"
            )
        if self.step_scale not in self.STEP_SCALES:
            raise ValueError(
                f"lopt core step_scale must be one of {self.STEP_SCALES}, got {self.step_scale!r}"
            )
        if not self.base_fan_in > 0:
            raise ValueError(f"lopt core base_fan_in must be > 0, got {self.base_fan_in}")
        for rule in ("heldout_step", "heldout_dir"):  # the two held-out rules' rate and bound
            rate, bound = getattr(self, f"{rule}_rate"), getattr(self, f"{rule}_max")
            if rate < 0 or not bound > 0:
                raise ValueError(
                    f"lopt core wants {rule}_rate >= 0 and {rule}_max > 0, got {rate} and {bound}"
                )
        if abs(self.heldout_step_init) > self.heldout_step_max:
            raise ValueError(
                f"lopt core heldout_step_init must be within ±heldout_step_max "
                f"({self.heldout_step_max}), got {self.heldout_step_init}"
            )
        if not self.train_step_rate >= 0 or (
            self.train_step_rate > 0 and not self.heldout_step_rate > 0
        ):
            raise ValueError(
                f"lopt core train_step_rate must be >= 0 and needs heldout_step_rate > 0 (it "
                f"moves the held-out rule's H_T), got {self.train_step_rate}"
            )
        if not 0 <= self.heldout_step_shrink <= 1:
            raise ValueError(
                f"lopt core heldout_step_shrink must be in [0, 1], got {self.heldout_step_shrink}"
            )
        if self.heldout_step_signal not in self.STEP_SIGNALS:
            raise ValueError(
                f"lopt core heldout_step_signal must be one of {self.STEP_SIGNALS}, got "
                f"{self.heldout_step_signal!r}"
            )
        if not 0 <= self.heldout_step_beta < 1:
            raise ValueError(
                f"lopt core heldout_step_beta must be in [0, 1), got {self.heldout_step_beta}"
            )
        if self.heldout_step_horizon < 0:
            raise ValueError(
                f"lopt core heldout_step_horizon must be >= 0, got {self.heldout_step_horizon}"
            )
        if self.heldout_step_horizon > 0 and not 0 <= self.progress_index < self.feature_dim:
            raise ValueError(
                f"heldout_step_horizon needs progress_index to name one of {self.feature_dim} "
                "features"
            )
        if self.heldout_step_gate not in self.DECAY_GATES:
            raise ValueError(
                f"lopt core heldout_step_gate must be one of {self.DECAY_GATES}, got "
                f"{self.heldout_step_gate!r}"
            )
        if self.heldout_step_gate != "none" and not self._names_trends():
            raise ValueError(
                f"heldout_step_gate {self.heldout_step_gate!r} needs trend_index and "
                f"heldout_trend_index to name one of {self.feature_dim} features"
            )
        for rate in ("heldout_dir_rate", "heldout_step_rate"):
            if getattr(self, rate) > 0 and self.decay_index < 0:
                raise ValueError(
                    f"{rate} needs the held-out gradient among the features (decay_index)"
                )
        if self.adapt_horizon > 0 and not 0 <= self.progress_index < self.feature_dim:
            raise ValueError(
                f"adapt_horizon needs progress_index to name one of {self.feature_dim} "
                f"features, got {self.progress_index}"
            )
        if self.backoff_rate > 0 and not 0 <= self.trend_index < self.feature_dim:
            raise ValueError(
                f"backoff_rate needs trend_index to name one of {self.feature_dim} features, "
                f"got {self.trend_index}"
            )

    def _names_trends(self) -> bool:
        """Whether trend_index and heldout_trend_index both name a feature (the two gates')."""
        return all(0 <= i < self.feature_dim for i in (self.trend_index, self.heldout_trend_index))

    @property
    def keeps_prev(self) -> bool:
        """Whether the state keeps the last step (for the cosine with the gradient)."""
        return self.hyper_feature or self.hyper_rate > 0 or self.heldout_step_rate > 0

    @property
    def stats_dim(self) -> int:
        """Controller inputs: 3 statistics per feature, log numel, log10 RMS(θ) (and with
        ``hyper_feature`` the cosine of the gradient with the last step)."""
        return 3 * self.feature_dim + 2 + int(self.hyper_feature)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """cos(a, b) of two flat tensors, 0 when either is 0."""
    return (a * b).sum() / (a.norm() * b.norm() + 1e-12)


def _overfitting(features: Tensor, gate: str, trend_index: int, held_index: int) -> Tensor:
    """Whether the loss features (one coordinate's row: they are global) show overfitting by
    ``gate`` ("gap" or "overfit", :class:`LoptConfig`'s ``decay_gate``): trends at columns
    ``trend_index`` (training) and ``held_index`` (held-out)."""
    train_trend = features[..., trend_index]
    held_trend = features[..., held_index]
    if gate == "gap":
        return held_trend > train_trend
    return (held_trend > 0) & (train_trend <= 0)


def mup_log_scales(shapes: list[tuple[int, ...]], base_fan_in: float) -> list[float]:
    """log(base_fan_in / fan_in) per tensor by μP's rule for Adam (see ``LoptConfig.step_scale``).

    0 for tensors of fewer than two dimensions and for the first tensor of two or more (the
    input layer); fan_in = numel / shape[0] otherwise.

    Example:
        >>> [round(v, 3) for v in mup_log_scales([(4, 2), (4,), (3, 4), (3,)], 8.0)]
        [0.0, 0.0, 0.693, 0.0]
    """
    scales, seen_input = [], False
    for shape in shapes:
        if len(shape) < 2:
            scales.append(0.0)
        elif not seen_input:
            seen_input = True
            scales.append(0.0)
        else:
            fan_in = math.prod(shape[1:])
            scales.append(math.log(base_fan_in / max(fan_in, 1)))
    return scales


def _per_run(t_ref: int, progress: Tensor, last: Tensor) -> Tensor:
    """min(1, T_ref / T) of a run of T steps, from two successive progress values t / T (1
    before the first step, ``last`` < 0). T = round(1 / Δ), so that float rounding of t / T
    never misreads T; Δ = 0 (past the horizon, progress clipped): 1 / Δ = inf, and 0."""
    per_run = (t_ref / torch.round(1.0 / (progress - last))).clamp(0, 1)
    return torch.where(last < 0, torch.ones_like(per_run), per_run)


def _entry(t: int, v: Tensor) -> Tensor:
    """Tensor t's entry of a per-tensor quantity (T, ...)."""
    return v[t]


def _rows(t: int, c: int, v: Tensor) -> Tensor:
    """Tensor t's row of ``v`` (T, U), once for each of its c coordinates: (c, U)."""
    return v[t].expand(c, -1)


def _bounded(x: Tensor, bound: float) -> Tensor:
    """bound · tanh(x / bound): the identity near 0, never beyond ±bound."""
    return bound * torch.tanh(x / bound)


class LoptCore:
    """Controller per tensor → MLP per coordinate → a step on Adam's direction.

    Meta-parameters: ``log_lr`` (1,); the controller ``ctrl.w1`` (U, 3F+2), ``ctrl.b1``
    (U), ``ctrl.w2`` (U, U), ``ctrl.b2`` (U), ``ctrl.w_out`` (2, U), ``ctrl.b_out`` (2)
    (immediate offset, adaptation rate); the coordinate MLP ``mlp.w1`` (H, F+U), ``mlp.b1``
    (H), ``mlp.w2`` (H, H), ``mlp.b2`` (H), ``mlp.w_out`` (2, H), ``mlp.b_out`` (2); with
    ``hyper_rate`` also ``hyper.log_rate`` (1,), log κ, and with ``backoff_rate``
    ``backoff.log_rate`` (1,), log γ, and with ``dir_gate`` ``gate.w`` (U,) and ``gate.b`` (1,).
    State: ``adapt`` (T,), the
    accumulated offsets A_T in the dict order of the parameters (and ``prev``, see
    :meth:`init_state`).

    Example:
        >>> core = LoptCore(feature_dim=3, base_index=1, param_index=2, out_init=0.0)
        >>> phi = core.init_meta_params(torch.Generator().manual_seed(0))
        >>> feats = {"w": torch.ones(3, 4, 3)}
        >>> upd, state, _ = core(phi, feats, core.init_state(phi, {"w": torch.zeros(3, 4)}))
        >>> torch.allclose(upd["w"], torch.full((3, 4), -3e-3))  # Adam's step at init
        True
    """

    name: ClassVar[str] = "lopt"

    def __init__(self, config: LoptConfig | None = None, **options: Any) -> None:
        self.config = build_config(LoptConfig, config, options, "lopt")

    @property
    def feature_dim(self) -> int:
        return self.config.feature_dim

    def init_meta_params(self, generator: torch.Generator) -> Params:
        """Hidden layers U(±1/√fan_in) (``torch.nn`` defaults); output weights
        U(±out_init/√fan_in) and biases zero (``out_init=0``: the untrained core takes
        Adam's step with learning rate ``lr_init``)."""
        c = self.config
        F, H, U = c.feature_dim, c.hidden, c.ctrl_hidden

        def unif(fan_in: int, *shape: int) -> Tensor:
            return (torch.rand(*shape, generator=generator) * 2 - 1) / math.sqrt(fan_in)

        phi = {
            "log_lr": torch.full((1,), math.log(c.lr_init)),
            "ctrl.w1": unif(c.stats_dim, U, c.stats_dim),
            "ctrl.b1": unif(c.stats_dim, U),
            "ctrl.w2": unif(U, U, U),
            "ctrl.b2": unif(U, U),
            "ctrl.w_out": unif(U, 2, U) * c.out_init,
            "ctrl.b_out": torch.zeros(2),
            "mlp.w1": unif(F + U, H, F + U),
            "mlp.b1": unif(F + U, H),
            "mlp.w2": unif(H, H, H),
            "mlp.b2": unif(H, H),
            "mlp.w_out": unif(H, 2, H) * c.out_init,
            "mlp.b_out": torch.zeros(2),
        }
        if c.hyper_rate > 0:
            phi["hyper.log_rate"] = torch.full((1,), math.log(c.hyper_rate))
        if c.backoff_rate > 0:
            phi["backoff.log_rate"] = torch.full((1,), math.log(c.backoff_rate))
        if c.dir_gate:
            phi["gate.w"] = unif(U, U) * c.out_init
            phi["gate.b"] = torch.zeros(1)
        if c.decay_index >= 0:
            phi["decay.log_init"] = torch.full((1,), math.log(c.decay_init))
            phi["decay.log_rate"] = torch.full((1,), math.log(c.decay_rate))
        return phi

    def init_state(self, meta_params: Params, params: Params) -> CoreState:
        """A_T = 0 for every tensor (the analyzer keeps the momenta and second moments); with
        ``hyper_feature`` or ``hyper_rate`` also every coordinate's last step, ``prev`` (N,),
        zero."""
        ref = next(iter(params.values()))
        state = {"adapt": torch.zeros(len(params), dtype=ref.dtype, device=ref.device)}
        if self.config.adapt_horizon > 0:  # the progress feature of the previous step
            state["progress"] = torch.zeros((), dtype=ref.dtype, device=ref.device)
        if self.config.decay_index >= 0:  # Ω_T, the held-out decay's accumulated log offset
            state["decay"] = torch.zeros(len(params), dtype=ref.dtype, device=ref.device)
        if self.config.decay_horizon > 0:  # the last progress value; -1: no step taken yet
            state["decay_progress"] = torch.full((), -1.0, dtype=ref.dtype, device=ref.device)
        if self.config.heldout_step_rate > 0:  # H_T, the held-out step rule's log offset
            state["heldout_step"] = torch.full(
                (len(params),), self.config.heldout_step_init, dtype=ref.dtype, device=ref.device
            )
            if self.config.heldout_step_signal == "consistency":  # averages of d_T and |d_T|
                state["step_signal"] = torch.zeros(
                    2, len(params), dtype=ref.dtype, device=ref.device
                )
            if self.config.heldout_step_horizon > 0:  # its last progress value; -1: none yet
                state["step_progress"] = torch.full((), -1.0, dtype=ref.dtype, device=ref.device)
        n = sum(v.numel() for v in params.values())
        if self.config.keeps_prev:
            state["prev"] = torch.zeros(n, dtype=ref.dtype, device=ref.device)
        if self.config.heldout_dir_rate > 0:  # D_T and the last step's correction part
            state["heldout_dir"] = torch.zeros(len(params), dtype=ref.dtype, device=ref.device)
            state["prev_dir"] = torch.zeros(n, dtype=ref.dtype, device=ref.device)
        return state

    def _inputs(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """A tensor's coordinate inputs (c, F) (θ → θ / RMS θ; the held-out decay's column
        zeroed) and its statistics (3F + 2,)."""
        c = self.config
        x = rearrange(f, "... F -> (...) F")  # (c, F)
        x = torch.nan_to_num(x, nan=0.0, posinf=1e4, neginf=-1e4)  # a bad coordinate stays local
        if c.decay_index >= 0:  # read by the decay alone (see LoptConfig.decay_index)
            x = x.index_fill(-1, torch.tensor([c.decay_index], device=x.device), 0.0)
        n = x.shape[0]
        extra = [x.new_full((1,), math.log(n) / 10.0)]
        if c.param_index >= 0:
            theta = x[:, c.param_index]
            rms = theta.pow(2).mean().sqrt()
            x = torch.cat(
                [
                    x[:, : c.param_index],
                    (theta / (rms + 1e-8)).clamp(-10.0, 10.0).unsqueeze(-1),
                    x[:, c.param_index + 1 :],
                ],
                dim=-1,
            )
            extra.append((torch.log10(rms + 1e-6) / 3.0).reshape(1))
        else:
            extra.append(x.new_zeros(1))
        base = x[:, c.base_index : c.base_index + 1] if c.base_index >= 0 else x[:, :1] * 0
        stats = torch.cat(
            [
                reduce(x, "c F -> F", "mean"),
                reduce(x.abs(), "c F -> F", "mean"),
                reduce(x * base, "c F -> F", "mean"),
                *extra,
            ]
        )  # (3F + 2,)
        return x, stats

    def _packed_inputs(self, f: Tensor, seg: Segments) -> tuple[Tensor, Tensor]:
        """:meth:`_inputs` of every tensor at once: packed features (m, n, F) -> the
        coordinate inputs (m, n, F) and the per-tensor statistics (m, T, 3F + 2)."""
        c = self.config
        x = torch.nan_to_num(f, nan=0.0, posinf=1e4, neginf=-1e4)
        if c.decay_index >= 0:
            x = x.index_fill(-1, torch.tensor([c.decay_index], device=x.device), 0.0)
        m = x.shape[0]
        log_n = x.new_tensor([math.log(n) / 10.0 for n in seg.sizes])
        extra = [log_n.reshape(1, seg.t, 1).expand(m, seg.t, 1)]
        if c.param_index >= 0:
            theta = x[..., c.param_index]
            rms = seg.mean(theta.pow(2)).sqrt()  # (m, T)
            x = torch.cat(
                [
                    x[..., : c.param_index],
                    (theta / (seg.spread(rms) + 1e-8)).clamp(-10.0, 10.0).unsqueeze(-1),
                    x[..., c.param_index + 1 :],
                ],
                dim=-1,
            )
            extra.append((torch.log10(rms + 1e-6) / 3.0).unsqueeze(-1))
        else:
            extra.append(x.new_zeros(m, seg.t, 1))
        base = x[..., c.base_index : c.base_index + 1] if c.base_index >= 0 else x[..., :1] * 0
        means = seg.mean(torch.cat([x, x.abs(), x * base], dim=-1))  # (m, T, 3F)
        return x, torch.cat([means, *extra], dim=-1)  # (m, T, 3F + 2)

    def _check_state(self, state: CoreState, tensors: int) -> None:
        if state["adapt"].shape[-1] != tensors:
            raise ValueError(
                f"core state holds {state['adapt'].shape[-1]} tensors, features name {tensors}"
            )

    def _control(self, phi: Params, state: CoreState, sig: dict[str, Any]) -> dict[str, Any]:
        """Every per-tensor quantity of a step, from the per-tensor signals ``sig``.

        ``sig`` holds ``stats`` (T, 3F+2) and, as the options need them, ``cos`` (T,),
        cos(g_t, Δθ_{t-1}), and ``shapes``; and functions that compute the rest when called:
        ``row`` (F,) (one coordinate's inputs: the global features are read from it),
        ``trend`` (T,), ``held`` (the held-out gradient), and ``cos_val``, ``cos_step`` or
        ``dot_step``, and ``cos_dir`` (T,): its cosines (or dot) with θ, the last step and
        its correction part. Shared by :meth:`__call__` and :meth:`packed`, which differ
        only in how they reduce coordinates to these signals and spread the results back
        (packed, every per-tensor shape has a leading instance dimension m, ``row`` is
        (m, 1, F) and the state's scalars (m, 1): the rules index the last dimension).
        Each is computed where the step first reads it, so that the per-tensor path creates
        its ops in one fixed order (the order in which autograd sums the gradients of a
        tensor read twice), the order it has always had: its meta-gradients are bit for bit
        those of earlier versions.
        """
        cfg = self.config
        out: dict[str, Any] = {}
        # 1. per-tensor controller: statistics -> log step offset a_T and context c_T
        s = sig["stats"]
        if cfg.hyper_feature:
            s = torch.cat([s, sig["cos"].unsqueeze(-1)], dim=-1)  # (T, 3F+3)
        h = torch.tanh(s @ phi["ctrl.w1"].T + phi["ctrl.b1"])  # (T, U)
        ctx = torch.tanh(h @ phi["ctrl.w2"].T + phi["ctrl.b2"])  # (T, U)
        out["ctx"] = ctx
        head = ctx @ phi["ctrl.w_out"].T + phi["ctrl.b_out"]  # (T, 2)
        limit = 2 * cfg.max_log_offset
        move = cfg.adapt_rate * torch.tanh(head[..., 1])
        progress: Any = None
        if cfg.adapt_horizon > 0 or cfg.decay_horizon > 0 or cfg.heldout_step_horizon > 0:
            progress = sig["row"]()[..., cfg.progress_index]  # t / T
        out["progress"] = progress
        if cfg.adapt_horizon > 0:  # per unit of progress: T_ref · Δ(t/T) = T_ref / T
            move = move * (cfg.adapt_horizon * (progress - state["progress"]).clamp_min(0.0))
        if cfg.hyper_rate > 0:  # hypergradient descent on the log step size
            move = move - torch.exp(phi["hyper.log_rate"]) * sig["cos"]
        if cfg.backoff_rate > 0:  # bold driver: shrink while the training loss rises
            move = move - torch.exp(phi["backoff.log_rate"]) * torch.relu(sig["trend"]())
        adapt = (state["adapt"] + move).clamp(-limit, limit)
        out["adapt"] = adapt
        offset = _bounded(head[..., 0] + adapt, cfg.max_log_offset)  # (T,)
        if cfg.step_scale != "none":  # μP's fixed per-tensor factor, outside the bound
            scales = mup_log_scales(sig["shapes"], cfg.base_fan_in)
            if cfg.step_scale == "mup_up":  # only enlarge: narrow layers
                scales = [max(v, 0.0) for v in scales]
            offset = offset + offset.new_tensor(scales)
        if cfg.decay_index >= 0:  # ∇θ of the held-out loss per tensor (0 on steps without a read)
            sig["held"]()
        if cfg.heldout_step_rate > 0:  # H_T −= κ_s cos(∇θ L_val(θ_t), Δθ_{t−1}) at each read
            if cfg.heldout_step_signal == "cos":
                cos_step = sig["cos_step"]()  # (T,)
            else:  # sign consistency r_T / m_T over the reads (steps with d_T ≠ 0)
                dot = sig["dot_step"]()  # (T,)
                read = dot != 0
                beta = cfg.heldout_step_beta
                avg = state["step_signal"]
                signal = torch.where(
                    read, beta * avg + (1 - beta) * torch.stack([dot, dot.abs()], dim=-2), avg
                )  # (2, T)
                out["signal"] = signal
                cos_step = torch.where(
                    read,
                    signal[..., 0, :] / signal[..., 1, :].clamp_min(1e-30),
                    torch.zeros_like(dot),
                )  # (T,), 0 on the steps without a read
            step_rate = torch.full_like(cos_step[:1], cfg.heldout_step_rate)
            if cfg.heldout_step_horizon > 0:  # κ_s · min(1, T_ref / T), as the decay's
                step_rate = step_rate * _per_run(
                    cfg.heldout_step_horizon, progress, state["step_progress"]
                )
            step_moves = -step_rate * cos_step  # (T,)
            if cfg.train_step_rate > 0:  # the training gradient's hypergradient, every step
                step_moves = step_moves - cfg.train_step_rate * sig["cos"]
            if cfg.heldout_step_shrink != 1:  # shrinking moves count ρ (short-horizon bias)
                step_moves = torch.where(
                    step_moves < 0, cfg.heldout_step_shrink * step_moves, step_moves
                )
            if cfg.heldout_step_gate != "none":  # growth only while no overfitting shows
                overfitting = _overfitting(  # the loss features are global: any coordinate's
                    sig["row"](), cfg.heldout_step_gate, cfg.trend_index, cfg.heldout_trend_index
                )
                step_moves = torch.where(
                    (step_moves < 0) | ~overfitting, step_moves, torch.zeros_like(step_moves)
                )
            heldout_step = (state["heldout_step"] + step_moves).clamp(
                -cfg.heldout_step_max, cfg.heldout_step_max
            )
            out["heldout_step"] = heldout_step
            offset = offset + heldout_step
        out["offset"] = offset
        out["gate"] = (
            2 * torch.sigmoid(ctx @ phi["gate.w"] + phi["gate.b"])  # (T,)
            if cfg.dir_gate
            else None
        )
        out["dir_gain"] = None
        if cfg.heldout_dir_rate > 0:  # D_T −= κ_d cos(∇θ L_val(θ_t), Δθ^d_{t−1}) at each read
            heldout_dir = (state["heldout_dir"] - cfg.heldout_dir_rate * sig["cos_dir"]()).clamp(
                -cfg.heldout_dir_max, 0.0
            )
            out["heldout_dir"] = heldout_dir
            out["dir_gain"] = torch.exp(heldout_dir)  # (T,)
        out["lam"] = None
        if cfg.decay_index >= 0:  # the held-out decay: Ω_T += κ cos(∇θ L_val, θ_T), λ_T
            span = math.log(cfg.decay_max / cfg.decay_min)
            rate = torch.exp(phi["decay.log_rate"])
            if cfg.decay_horizon > 0:  # κ · min(1, T_ref / T); T_ref · Δ(t/T) = T_ref / T
                rate = rate * _per_run(cfg.decay_horizon, progress, state["decay_progress"])
            moves = rate * sig["cos_val"]()  # (T,)
            if cfg.decay_gate != "none":  # growth only while overfitting shows (LoptConfig)
                overfitting = _overfitting(
                    sig["row"](), cfg.decay_gate, cfg.trend_index, cfg.heldout_trend_index
                )
                moves = torch.where((moves < 0) | overfitting, moves, torch.zeros_like(moves))
            decay = (state["decay"] + moves).clamp(-span, span)  # (T,)
            log_lam = (phi["decay.log_init"] + decay).clamp(
                math.log(cfg.decay_min), math.log(cfg.decay_max)
            )
            out["decay"], out["log_lam"] = decay, log_lam
            out["lam"] = torch.exp(log_lam)  # (T,)
        return out

    def _step(
        self,
        phi: Params,
        x: Tensor,
        ctl: dict[str, Any],
        pick: Callable[[Tensor], Tensor],
        rows: Callable[[Tensor], Tensor],
        theta: Callable[[], Tensor],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """2. the per-coordinate MLP -> direction correction d and log-magnitude s; 3. the
        step, for coordinates ``x`` (c, F) of one tensor, or (m, n, F) of all, packed.

        ``pick`` reads their value of a per-tensor quantity of :meth:`_control` (T,) (the
        tensor's, 0-d, or each coordinate's, (c,)), ``rows`` their rows of the context
        (T, U) -> (c, U), and ``theta()`` their θ as the analyzer gave it (for the decay).
        Returns the clipped step, the log step size, d and (with the direction rule) the
        correction's part of the step."""
        cfg = self.config
        z = torch.cat([x, rows(ctl["ctx"])], dim=-1)  # (c, F+U)
        a = torch.relu(z @ phi["mlp.w1"].T + phi["mlp.b1"])  # (c, H)
        a = torch.relu(a @ phi["mlp.w2"].T + phi["mlp.b2"])  # (c, H)
        out = a @ phi["mlp.w_out"].T + phi["mlp.b_out"]  # (c, 2)
        d = _bounded(out[..., 0], cfg.max_dir)  # (c,)
        if ctl["gate"] is not None:
            d = pick(ctl["gate"]) * d
        if ctl["dir_gain"] is not None:
            d = pick(ctl["dir_gain"]) * d
        mag = _bounded(out[..., 1], cfg.max_log_mag)  # (c,)
        log_step = phi["log_lr"] + pick(ctl["offset"]) + mag  # (c,)
        base = x[..., cfg.base_index] if cfg.base_index >= 0 else torch.zeros_like(d)
        size = torch.exp(log_step)  # (c,)
        step = -size * (base + d)  # (c,)
        dir_part = None
        if ctl["dir_gain"] is not None:  # the correction's part, for the next read
            dir_part = torch.nan_to_num(-size * d, 0.0, 0.0, 0.0)
        if ctl["lam"] is not None:  # decoupled decay with the tensor's step size
            th = theta()
            step = step - torch.exp(phi["log_lr"] + pick(ctl["offset"])) * pick(ctl["lam"]) * th
        step = torch.where(torch.isfinite(step), step, torch.zeros_like(step))
        step = step.clamp(-cfg.max_update, cfg.max_update)
        return step, log_step, d, dir_part

    def _finish(
        self,
        ctl: dict[str, Any],
        sig: dict[str, Any],
        log_step: Tensor,
        dirs: Tensor,
        steps: Tensor,
        prev: Tensor | None,
        prev_dir: Tensor | None,
        mean: Callable[[Tensor], Tensor] = Tensor.mean,
    ) -> tuple[CoreState, dict[str, Any]]:
        """The new state and the metrics, from :meth:`_control`'s quantities and every
        coordinate's log step, d and step (detached, packed) and the state's last step and
        correction part (packed, not detached). ``mean`` reduces a metric (per instance, on
        packed batches)."""
        cfg = self.config
        metrics = {
            "lopt/log_step_mean": mean(log_step),
            "lopt/offset_mean": mean(ctl["offset"].detach()),
            "lopt/adapt_mean": mean(ctl["adapt"].detach()),
            "lopt/dir_abs_mean": mean(dirs.abs()),
            "lopt/step_abs_mean": mean(steps.abs()),
        }
        new_state = {"adapt": ctl["adapt"]}
        if cfg.adapt_horizon > 0:
            new_state["progress"] = ctl["progress"]
        if ctl["lam"] is not None:
            new_state["decay"] = ctl["decay"]
            if cfg.decay_horizon > 0:
                new_state["decay_progress"] = ctl["progress"]
            metrics["lopt/log_decay_mean"] = mean(ctl["log_lam"].detach())
        if cfg.heldout_step_rate > 0:
            new_state["heldout_step"] = ctl["heldout_step"]
            if cfg.heldout_step_horizon > 0:
                new_state["step_progress"] = ctl["progress"]
            if cfg.heldout_step_signal == "consistency":
                new_state["step_signal"] = ctl["signal"]
            metrics["lopt/heldout_step_mean"] = mean(ctl["heldout_step"].detach())
        if cfg.heldout_dir_rate > 0:
            assert prev_dir is not None
            new_state["heldout_dir"] = ctl["heldout_dir"]
            new_state["prev_dir"] = prev_dir
            metrics["lopt/heldout_dir_mean"] = mean(ctl["heldout_dir"].detach())
        if ctl["gate"] is not None:
            metrics["lopt/gate_mean"] = mean(ctl["gate"].detach())
        if cfg.keeps_prev:
            assert prev is not None
            new_state["prev"] = prev
            metrics["lopt/hyper_cos_mean"] = mean(sig["cos"].detach())
        return new_state, metrics

    def __call__(
        self, meta_params: Params, features: dict[str, Tensor], state: CoreState
    ) -> tuple[Params, CoreState, dict[str, Any]]:
        cfg = self.config
        names = list(features)
        ref = features[names[0]]
        phi = as_dtype(meta_params, ref.dtype)
        check_feature_dim(features, cfg.feature_dim)
        self._check_state(state, len(names))
        inputs = [self._inputs(features[k]) for k in names]
        xs = [x for x, _ in inputs]
        sizes = [x.shape[0] for x in xs]  # coordinates per tensor

        def theta(k: str) -> Tensor:
            return features[k][..., cfg.param_index].reshape(-1)

        @cache
        def held() -> list[Tensor]:  # ∇θ of the held-out loss (0 on steps without a read)
            return [
                torch.nan_to_num(
                    features[k][..., cfg.decay_index].reshape(-1), nan=0.0, posinf=0.0, neginf=0.0
                )
                for k in names
            ]

        def cos_dir() -> Tensor:
            prev_dirs = torch.split(state["prev_dir"], sizes)
            return torch.stack([_cosine(g, p) for g, p in zip(held(), prev_dirs)])

        sig: dict[str, Any] = {
            "stats": torch.stack([st for _, st in inputs]),  # (T, 3F+2)
            "row": lambda: xs[0][0],
            "trend": lambda: torch.stack([x[0, cfg.trend_index] for x in xs]),  # (T,)
            "shapes": [tuple(features[k].shape[:-1]) for k in names],
            "held": held,
            "cos_val": lambda: torch.stack([_cosine(g, theta(k)) for k, g in zip(names, held())]),
            "cos_dir": cos_dir,
        }
        if cfg.keeps_prev:  # cos(g_t, Δθ_{t-1}) per tensor (0 before the first step)
            prevs = torch.split(state["prev"], sizes)
            sig["cos"] = torch.stack([_cosine(x[:, 0], p) for x, p in zip(xs, prevs)])
            sig["cos_step"] = lambda: torch.stack([_cosine(g, p) for g, p in zip(held(), prevs)])
            sig["dot_step"] = lambda: torch.stack([(g * p).sum() for g, p in zip(held(), prevs)])
        ctl = self._control(phi, state, sig)
        updates: Params = {}
        logs, dirs, steps, dir_parts = [], [], [], []
        for t, k in enumerate(names):
            x = xs[t]
            step, log_step, d, dir_part = self._step(
                phi,
                x,
                ctl,
                partial(_entry, t),
                partial(_rows, t, x.shape[0]),
                partial(theta, k),
            )
            dir_parts.append(dir_part)
            updates[k] = step.reshape(features[k].shape[:-1])
            logs.append(log_step.detach())
            dirs.append(d.detach())
            steps.append(step.detach())
        prev_dir = torch.cat(dir_parts) if cfg.heldout_dir_rate > 0 else None  # type: ignore[arg-type]
        prev = torch.cat([u.reshape(-1) for u in updates.values()]) if cfg.keeps_prev else None
        new_state, metrics = self._finish(
            ctl, sig, torch.cat(logs), torch.cat(dirs), torch.cat(steps), prev, prev_dir
        )
        return updates, new_state, metrics

    def packed(
        self, meta_params: Params, features: Tensor, state: CoreState, segments: Segments
    ) -> tuple[Tensor, CoreState, dict[str, Any]]:
        """:meth:`__call__` on packed tensors (:mod:`selfref.net.packing`) of m instances
        that share φ: features (m, n, F) in ``segments``' layout and the m instances' states
        (their scalars (m, 1)) -> the packed steps (m, n), the new states and the metrics
        (m,). The same mathematics with every op taken once over all coordinates of all
        instances; per-tensor sums are accumulated in another order, so the two agree to
        float rounding."""
        cfg = self.config
        phi = as_dtype(meta_params, features.dtype)
        check_feature_dim({PACKED: features}, cfg.feature_dim)
        self._check_state(state, segments.t)
        x, stats = self._packed_inputs(features, segments)

        def theta() -> Tensor:
            return features[..., cfg.param_index]

        @cache
        def held() -> Tensor:
            return torch.nan_to_num(features[..., cfg.decay_index], nan=0.0, posinf=0.0, neginf=0.0)

        sig: dict[str, Any] = {
            "stats": stats,
            "row": lambda: x[:, :1],  # (m, 1, F): per instance, broadcast over its tensors
            "trend": lambda: segments.first(x[..., cfg.trend_index]),
            "shapes": list(segments.shapes),
            "held": held,
            "cos_val": lambda: segments.cosine(held(), theta()),
            "cos_dir": lambda: segments.cosine(held(), state["prev_dir"]),
        }
        if cfg.keeps_prev:
            sig["cos"] = segments.cosine(x[..., 0], state["prev"])
            sig["cos_step"] = lambda: segments.cosine(held(), state["prev"])
            sig["dot_step"] = lambda: segments.sum(held() * state["prev"])
        ctl = self._control(phi, state, sig)
        step, log_step, d, dir_part = self._step(
            phi, x, ctl, segments.spread, segments.spread, theta
        )
        new_state, metrics = self._finish(
            ctl,
            sig,
            log_step.detach(),
            d.detach(),
            step.detach(),
            step if cfg.keeps_prev else None,
            dir_part,
            mean=partial(Tensor.mean, dim=-1),
        )
        return step, new_state, metrics
