"""The *evaluation* model: the quality Q of the current weights, its gradient, and
(optionally) a learned estimate of the validation loss.

Q is the task loss on a minibatch (Andrychowicz et al. 2016, section 2: the optimizee's
objective f(θ)). :meth:`EvaluationModel.value_and_grad` returns Q (differentiable in θ, so
in the meta-parameters through the trajectory) and ∇θQ, computed with ``torch.func.grad``
so it composes with ``vmap``. By default the gradient handed to the analyzer is detached —
the paper drops the second derivatives (section 2.1, "the assumption that ∂∇t/∂φ = 0") — and
``second_order=True`` keeps them.

Held-out measurements: when a batch carries a held-out minibatch under ``"heldout"`` (from
the val split; the evaluation model never reads test), Q is measured on it too, forward
only and detached (``value_and_grad_many``'s ``extra["heldout_loss"]``,
:meth:`EvaluationModel.heldout_loss`), and handed to the analyzer with the training loss.
``heldout_every`` k > 0 says that callers put one in every k-th step's batch
(:meth:`EvaluationModel.reads_heldout`); each costs one forward pass. With ``heldout_grad``
the read also takes ∇θ of the held-out minibatch's loss (detached; ``extra["heldout_grad"]``),
for modifiers that set a few per-tensor scalars by it (the ``lopt`` core's held-out decay);
each read then costs a forward and a backward pass, one gradient evaluation
(:attr:`EvaluationConfig.heldout_cost`).

The optional learned value model (``learned_value=True``) is a small MLP that maps summary
statistics of the current state — log10 Q on the training batch, log10 ‖∇θQ‖ and the
fraction of the horizon elapsed — to an estimate of log10 of the validation loss. It is
trained inside the meta-loop by regression onto the measured validation loss at the end of
each truncation (its inputs are detached, so it never changes the modifier's gradient).

Notation: H – hidden units of the value MLP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad_and_value

from selfref.net.normal import NormalModel
from selfref.params import Params, tree_detach
from selfref.tasks.base import Batch

__all__ = ["EvaluationConfig", "EvaluationModel", "VALUE_FEATURES"]


def _train_part(batch: Batch) -> Batch:
    """The training minibatch of a batch that may also carry a held-out one."""
    return {k: v for k, v in batch.items() if k != "heldout"} if "heldout" in batch else batch


VALUE_FEATURES: tuple[str, ...] = ("log10_train_loss", "log10_grad_norm", "horizon_fraction")


@dataclass(frozen=True)
class EvaluationConfig:
    """How Q and ∇θQ are computed and whether a value model is learned."""

    second_order: bool = False  # keep ∂∇θQ/∂φ (paper: dropped, gradients detached)
    learned_value: bool = False  # learn an estimate of log10 validation loss in the meta-loop
    value_hidden: int = 16  # H, hidden units of the value MLP
    value_weight: float = 1.0  # weight of the value regression in the meta-loss
    heldout_every: int = 0  # measure Q on a held-out (val) minibatch every k steps (0 = never)
    heldout_grad: bool = False  # also take ∇θ of that held-out loss (needs heldout_every > 0)

    def __post_init__(self) -> None:
        if self.heldout_every < 0:
            raise ValueError(f"heldout_every must be >= 0, got {self.heldout_every}")
        if self.value_hidden < 1:
            raise ValueError(f"value_hidden must be >= 1, got {self.value_hidden}")
        if self.value_weight < 0:
            raise ValueError(f"value_weight must be >= 0, got {self.value_weight}")
        if self.heldout_grad and not self.heldout_every:
            raise ValueError("heldout_grad needs heldout_every > 0")

    @property
    def heldout_cost(self) -> float:
        """Gradient evaluations one held-out read costs: ½ (a forward pass), or 1 with
        ``heldout_grad`` (forward and backward)."""
        return 1.0 if self.heldout_grad else 0.5


class EvaluationModel:
    """Computes Q(θ) on a batch, ∇θQ, and the optional learned value estimate.

    Args:
        normal: the task network.
        config: see :class:`EvaluationConfig`.
    """

    def __init__(self, normal: NormalModel, config: EvaluationConfig | None = None) -> None:
        self.normal = normal
        self.config = config or EvaluationConfig()

    def loss(self, params: Params, batch: Batch) -> Tensor:
        return self.normal.loss(params, batch)

    def value_and_grad(self, params: Params, batch: Batch) -> tuple[Tensor, Params]:
        """(Q(θ), ∇θQ); the gradient is detached unless ``second_order``."""
        grads, q = grad_and_value(self.normal.loss)(params, _train_part(batch))
        if not self.config.second_order:
            grads = tree_detach(grads)
        return q, grads

    def reads_heldout(self, step: int) -> bool:
        """Whether step ``step`` (0-based) measures Q on a held-out minibatch."""
        k = self.config.heldout_every
        return k > 0 and step % k == 0

    def heldout_loss(self, params: Params, batch: Batch) -> Tensor | None:
        """Q on the batch's held-out minibatch (detached), or None when it carries none."""
        if "heldout" not in batch:
            return None
        with torch.no_grad():
            held: Batch = batch["heldout"]  # type: ignore[assignment]  # a nested batch
            return self.normal.loss(tree_detach(params), held)

    def heldout_value_and_grad(self, params: Params, batch: Batch) -> dict[str, Any]:
        """What a step reads of the batch's held-out minibatch, detached: ``heldout_loss``
        and, with ``heldout_grad``, ``heldout_grad`` (∇θ of it); {} when it carries none."""
        if "heldout" not in batch:
            return {}
        held: Batch = batch["heldout"]  # type: ignore[assignment]  # a nested batch
        if not self.config.heldout_grad:
            return {"heldout_loss": self.heldout_loss(params, batch)}
        with torch.enable_grad():
            g, q = grad_and_value(self.normal.loss)(tree_detach(params), held)
        return {"heldout_loss": q.detach(), "heldout_grad": tree_detach(g)}

    def value_and_grad_many(
        self, params: Params, batch: Batch
    ) -> tuple[Tensor, Params, dict[str, Any], Params]:
        """Q and ∇θQ of m stacked instances at once, plus held-out measurements.

        ∇θQ comes from one reverse pass of Σ_i Q_i(θ_i) (the instances share no weights, so
        each gradient is its own instance's). When ``batch`` carries a held-out minibatch
        under ``"heldout"`` (same keys, leading dimension m), Q on it is measured too —
        forward only, detached — and returned as ``extra["heldout_loss"]`` (with
        ``heldout_grad`` also its gradient, ``extra["heldout_grad"]``, detached).

        Returns:
            (q (m,), grads, extra, params as used): ``q`` is differentiable in the incoming
            params (so in φ through earlier steps); grads are detached unless
            ``second_order``; under ``torch.no_grad`` everything comes back detached.
        """
        ps = {k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()}
        with torch.enable_grad():
            q = torch.func.vmap(self.normal.loss)(ps, _train_part(batch))  # (m,)
            g = torch.autograd.grad(
                q.sum(), list(ps.values()), create_graph=self.config.second_order, retain_graph=True
            )
        grads = dict(zip(ps, g))
        if not torch.is_grad_enabled():
            q = q.detach()
            ps = {k: v.detach() for k, v in ps.items()}
        extra: dict[str, Any] = {}
        if "heldout" in batch:
            held: Any = batch["heldout"]  # a minibatch (dict) under the "heldout" key
            if self.config.heldout_grad:  # one reverse pass of Σ_i Q_i^val(θ_i), as above
                pd = {k: v.detach().requires_grad_() for k, v in ps.items()}
                with torch.enable_grad():
                    hq = torch.func.vmap(self.normal.loss)(pd, held)  # (m,)
                    hg = torch.autograd.grad(hq.sum(), list(pd.values()))
                extra["heldout_loss"] = hq.detach()
                extra["heldout_grad"] = {k: v.detach() for k, v in zip(pd, hg)}
            else:
                with torch.no_grad():
                    extra["heldout_loss"] = torch.func.vmap(self.normal.loss)(
                        {k: v.detach() for k, v in ps.items()}, held
                    )
        return q, grads, extra, ps

    # -- learned value model ---------------------------------------------------------------

    def init_meta_params(self, generator: torch.Generator) -> Params:
        """Weights of the value MLP (empty when ``learned_value`` is off)."""
        if not self.config.learned_value:
            return {}
        h, f = self.config.value_hidden, len(VALUE_FEATURES)
        b1, b2 = 1.0 / math.sqrt(f), 1.0 / math.sqrt(h)
        return {
            "w1": (torch.rand(h, f, generator=generator) * 2 - 1) * b1,
            "b1": torch.zeros(h),
            "w2": (torch.rand(1, h, generator=generator) * 2 - 1) * b2,
            "b2": torch.zeros(1),
        }

    def predict_value(self, meta_params: Params, features: Tensor) -> Tensor:
        """Estimated log10 validation loss from (..., len(VALUE_FEATURES)) features."""
        if not meta_params:
            raise ValueError("predict_value needs learned_value=True (no value-model weights)")
        w1, b1 = meta_params["w1"].to(features.dtype), meta_params["b1"].to(features.dtype)
        w2, b2 = meta_params["w2"].to(features.dtype), meta_params["b2"].to(features.dtype)
        h = torch.tanh(features @ w1.T + b1)  # (..., H)
        return (h @ w2.T + b2).squeeze(-1)  # (...)
