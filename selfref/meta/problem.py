"""What meta-training optimizes: the :class:`MetaProblem` protocol and its carry.

Every meta-training in selfref — a learned optimizer on a task family, a sequence learner on
``fewshot-digits``, a learned black-box optimizer on GP samples — is one *meta-problem*:
meta-parameters φ, and an inner computation that φ drives, run in *truncations* of a few
steps over trajectories of a longer *horizon*. The gradient estimators of
:mod:`selfref.meta.estimators` (truncated/full BPTT, ES, truncated ES, PES) see only this
interface, and the one trainer (:mod:`selfref.meta.trainer`) sees only estimators and
problems — the split of google/learned_optimization's ``outer_trainers`` (a task family and
a truncated step on one side, a ``GradientEstimator`` on the other).

The carry between truncations is an :class:`Inner`: n trajectories ("instances": task
instances, sequences, particles), their seeds, and how far along their horizon they are. It
holds only tensors, ints and lists, so it goes into a checkpoint as it is.

Per-instance meta-parameters: ES and PES evaluate many perturbed copies of φ at once. A
problem's :meth:`MetaProblem.unroll` takes ``per_instance=True`` to read φ with a leading
instance dimension n (instance i runs φ_i), which problems implement with
``torch.func.vmap`` over the instances (the particles are evaluated together).

Notation: n – instances (trajectories) in a carry, K – truncation length, T – horizon.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from selfref.params import Params

__all__ = ["Inner", "Truncation", "MetaProblem", "detach_tree", "tree_index", "tree_select"]


def detach_tree(tree: Any) -> Any:
    """Detach every tensor of a nested dict/list (other leaves pass through)."""
    if isinstance(tree, dict):
        return {k: detach_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(detach_tree(v) for v in tree)
    if isinstance(tree, Tensor):
        return tree.detach()
    return tree


def tree_index(tree: Any, index: Tensor | slice | list[int]) -> Any:
    """Rows ``index`` of every tensor of a nested dict (leading dimension n)."""
    if isinstance(tree, dict):
        return {k: tree_index(v, index) for k, v in tree.items()}
    if isinstance(tree, Tensor):
        return tree[index]
    return tree


def tree_select(mask: Tensor, a: Any, b: Any) -> Any:
    """Per instance: ``a`` where ``mask`` (n,) is true, else ``b`` (same structure)."""
    if isinstance(a, dict):
        return {k: tree_select(mask, a[k], b[k]) for k in a}
    if isinstance(a, Tensor):
        m = mask.reshape(-1, *([1] * (a.dim() - 1)))
        return torch.where(m, a, b)
    return a


@dataclass
class Inner:
    """The carry of n inner trajectories between truncations.

    Attributes:
        data: the trajectories' state, a nested dict of tensors with leading dimension n
            (for a learned optimizer: the weights θ and the network state).
        seeds: the n instance seeds (which task instance / data stream each one is).
        t: steps taken so far (all n trajectories advance together).
        horizon: steps after which the trajectories are replaced by fresh ones.
    """

    data: dict[str, Any]
    seeds: list[int]
    t: int
    horizon: int

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def done(self) -> bool:
        return self.t >= self.horizon

    @property
    def remaining(self) -> int:
        return max(0, self.horizon - self.t)

    def check_truncation(self, length: int) -> None:
        """Raise ValueError if a truncation of ``length`` steps would pass the horizon."""
        if self.t + length > self.horizon:
            raise ValueError(f"truncation of {length} steps from t={self.t} passes {self.horizon}")

    def detached(self) -> Inner:
        return Inner(detach_tree(self.data), list(self.seeds), self.t, self.horizon)

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data, "seeds": list(self.seeds), "t": self.t, "horizon": self.horizon}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Inner:
        return cls(d["data"], [int(s) for s in d["seeds"]], int(d["t"]), int(d["horizon"]))


@dataclass
class Truncation:
    """What one truncation of K steps returns.

    Attributes:
        loss: (n,) each trajectory's meta-loss over the K steps (Σ_t w_t ℓ_t);
            differentiable in φ when φ requires grad (and grad is enabled).
        inner: the carry after the K steps (attached to the graph when differentiable).
        grad_evals: what the forward part cost, in gradient evaluations of the inner model
            (see :mod:`selfref.budget`); an estimator that backpropagates adds
            ``backward_evals``.
        backward_evals: the extra cost of backpropagating through these K steps.
        metrics: scalars to log (means over the instances).
        per_step: optional (n, K) per-step losses, detached (for curves and diagnostics).
    """

    loss: Tensor
    inner: Inner
    grad_evals: float
    backward_evals: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    per_step: Tensor | None = None


@runtime_checkable
class MetaProblem(Protocol):
    """A meta-training problem: φ and the inner computation it drives.

    Attributes:
        name: a short name for logs and checkpoints.
        device, dtype: where φ and the inner computation live.
    """

    name: str
    device: torch.device
    dtype: torch.dtype

    def init_meta_params(self, generator: torch.Generator) -> Params:
        """A fresh φ drawn from ``generator``."""
        ...

    def describe(self) -> dict[str, Any]:
        """Plain data that identifies the problem (goes in checkpoints; compared on resume)."""
        ...

    def init_inner(
        self, meta_params: Params, generator: torch.Generator, n: int, horizon: int, step: int
    ) -> Inner:
        """n fresh trajectories of ``horizon`` steps, started at meta-step ``step``.

        Instance choice comes from ``generator`` (the trainer's per-step, per-rank stream);
        problems whose data follow a schedule over meta-steps (a curriculum) read ``step``.
        """
        ...

    def unroll(
        self, meta_params: Params, inner: Inner, length: int, per_instance: bool = False
    ) -> Truncation:
        """Advance ``inner`` by ``length`` steps under φ.

        Args:
            meta_params: φ; with ``per_instance`` every tensor has a leading dimension n
                and instance i runs φ_i (ES/PES particles).
            inner: the carry (its ``t`` + ``length`` must not pass its horizon).
            length: K.
            per_instance: see ``meta_params``.
        """
        ...

    def evaluate(self, meta_params: Params) -> dict[str, float]:
        """Held-out evaluation of φ: ``score`` (lower is better) and anything else to log."""
        ...
