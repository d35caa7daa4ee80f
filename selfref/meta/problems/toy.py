"""Toy meta-problems with known gradients, for testing and benchmarking the estimators.

Both are tiny, deterministic and differentiable end to end, so the true full-horizon
meta-gradient is one float64 autograd pass through the whole horizon
(:meth:`InfluenceBalancing.full_loss`, :meth:`QuadraticLearningRate.full_loss`), and both
implement :class:`~selfref.meta.problem.MetaProblem`, so the one trainer meta-trains them.

- :class:`InfluenceBalancing` — the influence-balancing problem of Tallec & Ollivier 2018
  ("Unbiased online recurrent optimization", UORO) as Vicol, Metz & Sohl-Dickstein 2021 set
  it up (§5.1, and their code): a linear system whose state s ∈ R^23 evolves as
  s_{t+1} = A s_t + θ·σ with A = ½I + ½·(superdiagonal) and σ = (+1 × 10, −1 × 13); the
  loss at every step is ½(s_t[0] − 1)². θ pushes s[0] up in the short run (the first 10
  signs) and down in the long run (all 23), so truncated BPTT with short truncations points
  the wrong way. The meta-objective is exactly quadratic in θ, so Gaussian smoothing (ES,
  PES) does not move its gradient: ES and PES are unbiased for the *true* gradient here.
- :class:`QuadraticLearningRate` — meta-learn the log learning rate of gradient descent on
  one fixed ill-conditioned quadratic f(x) = ½ Σ_i h_i x_i² (h log-spaced in [h_min, 1],
  x_0 = 1): ``segments`` = 1 learns one log learning rate, more learn a piecewise-constant
  schedule (segment j rules the steps t with ⌊t·S/T⌋ = j). Every trajectory is the same
  instance (the instance seeds are drawn but not used).

Meta-loss: the mean loss over the horizon, Σ_{t=1}^{T} ℓ_t / T, so a truncation's loss is
its steps' share Σ_{t∈truncation} ℓ_t / T and the truncations of one trajectory sum to the
full-horizon objective whatever K is. ``per_instance=True`` reads φ with a leading
dimension n; the n trajectories are computed together as one batched tensor program.

Cost (:mod:`selfref.budget`): a gradient-descent step takes one gradient of f (1 gradient
evaluation per trajectory, also when only run forward), backpropagating through it about
one more; a step of the influence-balancing system is a forward pass of a linear map, ½,
and its backward another ½.

Notation: n – trajectories, d – state size, K – truncation length, T – horizon, S – segments.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from selfref.meta.problem import Inner, Truncation
from selfref.params import Params

__all__ = ["InfluenceBalancing", "QuadraticLearningRate"]


def _seeds(generator: torch.Generator, n: int) -> list[int]:
    """n instance seeds from the trainer's stream (the toy problems have one instance)."""
    return torch.randint(0, 2**30, (n,), generator=generator).tolist()


class InfluenceBalancing:
    """The influence-balancing problem (Vicol et al. 2021, §5.1; Tallec & Ollivier 2018).

    Args:
        theta0: the initial θ (Vicol et al.: 0.5).
        size: the state size d (paper: 23).
        positive: how many leading components θ drives up (paper: 10; the rest down).
        eval_steps: the horizon of the held-out evaluation and of :meth:`full_loss`'s
            default (the meta-objective the estimators are compared on).
        dtype, device: where θ and the state live (default float64 on the CPU).

    Example:
        >>> p = InfluenceBalancing(eval_steps=100)
        >>> phi = p.init_meta_params(torch.Generator().manual_seed(0))
        >>> round(p.evaluate(phi)["score"], 3)  # mean ½(s[0] - 1)² over 100 steps at θ = 0.5
        9.948
    """

    name = "influence_balancing"

    def __init__(
        self,
        theta0: float = 0.5,
        size: int = 23,
        positive: int = 10,
        eval_steps: int = 1000,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ) -> None:
        if size < 2 or not 0 <= positive <= size:
            raise ValueError(f"need size >= 2 and 0 <= positive <= size, got {size}, {positive}")
        if eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1, got {eval_steps}")
        self.theta0, self.size, self.positive, self.eval_steps = theta0, size, positive, eval_steps
        self.dtype, self.device = dtype, torch.device(device)
        kw: dict[str, Any] = {"dtype": dtype, "device": self.device}
        # A = ½I + ½·superdiagonal: s[i] mixes with s[i + 1], so s[0] feels every component
        self.A = 0.5 * torch.eye(size, **kw) + 0.5 * torch.diag(torch.ones(size - 1, **kw), 1)
        self.sign = torch.cat([torch.ones(positive, **kw), -torch.ones(size - positive, **kw)])

    def init_meta_params(self, generator: torch.Generator) -> Params:
        return {"theta": torch.tensor([self.theta0], dtype=self.dtype, device=self.device)}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "theta0": self.theta0,
            "size": self.size,
            "positive": self.positive,
            "eval_steps": self.eval_steps,
        }

    def init_inner(
        self, meta_params: Params, generator: torch.Generator, n: int, horizon: int, step: int
    ) -> Inner:
        s = torch.ones(n, self.size, dtype=self.dtype, device=self.device)  # (n, d)
        return Inner({"s": s}, _seeds(generator, n), 0, horizon)

    def unroll(
        self, meta_params: Params, inner: Inner, length: int, per_instance: bool = False
    ) -> Truncation:
        inner.check_truncation(length)
        theta = meta_params["theta"]  # (1,) or, per instance, (n, 1)
        drive = theta * self.sign  # (d,) or (n, d)
        s = inner.data["s"]  # (n, d)
        losses = []
        for _ in range(length):
            s = s @ self.A.T + drive
            losses.append(0.5 * (s[:, 0] - 1) ** 2)  # (n,)
        per_step = torch.stack(losses, dim=1)  # (n, K)
        n = inner.n
        return Truncation(
            loss=per_step.sum(dim=1) / inner.horizon,
            inner=Inner({"s": s}, list(inner.seeds), inner.t + length, inner.horizon),
            grad_evals=0.5 * n * length,
            backward_evals=0.5 * n * length,
            metrics={"inner/s0": float(s[:, 0].detach().mean())},
            per_step=per_step.detach(),
        )

    def full_loss(self, meta_params: Params, horizon: int | None = None) -> Tensor:
        """The meta-objective Σ_{t=1}^{T} ½(s_t[0] − 1)² / T of one trajectory from s_0 = 1
        (differentiable in φ: autograd through it is the true full-horizon gradient)."""
        horizon = horizon or self.eval_steps
        inner = Inner(
            {"s": torch.ones(1, self.size, dtype=self.dtype, device=self.device)}, [0], 0, horizon
        )
        return self.unroll(meta_params, inner, horizon).loss[0]

    def evaluate(self, meta_params: Params) -> dict[str, float]:
        with torch.no_grad():
            loss = float(self.full_loss(meta_params))
        return {
            "score": loss if math.isfinite(loss) else math.inf,
            "loss": loss,
            "theta": float(meta_params["theta"].reshape(-1)[0]),
            "grad_evals": 0.5 * self.eval_steps,
        }


class QuadraticLearningRate:
    """Meta-learn the log learning rate (or schedule) of gradient descent on a quadratic.

    Args:
        dim: d, dimensions of the quadratic.
        h_min: the smallest curvature (the largest is 1; log-spaced between).
        segments: S, learning-rate segments over the horizon (1 = one learning rate).
        lr0: the initial learning rate (φ = log lr0 in every segment).
        eval_steps: the horizon of the held-out evaluation and of :meth:`full_loss`.
        dtype, device: where φ and x live (default float64 on the CPU).

    Example:
        >>> p = QuadraticLearningRate(eval_steps=50)
        >>> phi = p.init_meta_params(torch.Generator().manual_seed(0))
        >>> p.full_loss({"log_lr": phi["log_lr"] + 1}) < p.full_loss(phi)  # a larger lr helps
        tensor(True)
    """

    name = "quadratic_lr"

    def __init__(
        self,
        dim: int = 10,
        h_min: float = 1e-3,
        segments: int = 1,
        lr0: float = 0.1,
        eval_steps: int = 1000,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ) -> None:
        if dim < 1 or segments < 1 or eval_steps < 1:
            raise ValueError(
                f"dim, segments and eval_steps must be >= 1, got {dim}, {segments}, {eval_steps}"
            )
        if not 0 < h_min <= 1 or not lr0 > 0:
            raise ValueError(f"need 0 < h_min <= 1 and lr0 > 0, got {h_min}, {lr0}")
        self.dim, self.h_min, self.segments, self.lr0 = dim, h_min, segments, lr0
        self.eval_steps = eval_steps
        self.dtype, self.device = dtype, torch.device(device)
        self.h = torch.logspace(math.log10(h_min), 0.0, dim, dtype=dtype, device=self.device)

    def init_meta_params(self, generator: torch.Generator) -> Params:
        log_lr = torch.full(
            (self.segments,), math.log(self.lr0), dtype=self.dtype, device=self.device
        )
        return {"log_lr": log_lr}

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.name,
            "dim": self.dim,
            "h_min": self.h_min,
            "segments": self.segments,
            "lr0": self.lr0,
            "eval_steps": self.eval_steps,
        }

    def init_inner(
        self, meta_params: Params, generator: torch.Generator, n: int, horizon: int, step: int
    ) -> Inner:
        x = torch.ones(n, self.dim, dtype=self.dtype, device=self.device)  # (n, d)
        return Inner({"x": x}, _seeds(generator, n), 0, horizon)

    def unroll(
        self, meta_params: Params, inner: Inner, length: int, per_instance: bool = False
    ) -> Truncation:
        inner.check_truncation(length)
        log_lr = meta_params["log_lr"]  # (S,) or, per instance, (n, S)
        x = inner.data["x"]  # (n, d)
        losses = []
        for t in range(inner.t, inner.t + length):
            seg = t * self.segments // inner.horizon
            lr = log_lr[..., seg].exp()  # () or (n,)
            lr = lr.unsqueeze(-1) if per_instance else lr  # (n, 1) or ()
            x = x - lr * (self.h * x)  # one gradient step: ∇f = h ⊙ x
            losses.append(0.5 * (self.h * x * x).sum(dim=1))  # (n,)
        per_step = torch.stack(losses, dim=1)  # (n, K)
        n = inner.n
        return Truncation(
            loss=per_step.sum(dim=1) / inner.horizon,
            inner=Inner({"x": x}, list(inner.seeds), inner.t + length, inner.horizon),
            grad_evals=float(n * length),
            backward_evals=float(n * length),
            metrics={"inner/final_loss": float(per_step[:, -1].detach().mean())},
            per_step=per_step.detach(),
        )

    def full_loss(self, meta_params: Params, horizon: int | None = None) -> Tensor:
        """The meta-objective Σ_{t=1}^{T} f(x_t) / T of the trajectory from x_0 = 1
        (differentiable in φ: autograd through it is the true full-horizon gradient)."""
        horizon = horizon or self.eval_steps
        inner = Inner(
            {"x": torch.ones(1, self.dim, dtype=self.dtype, device=self.device)}, [0], 0, horizon
        )
        return self.unroll(meta_params, inner, horizon).loss[0]

    def evaluate(self, meta_params: Params) -> dict[str, float]:
        with torch.no_grad():
            loss = float(self.full_loss(meta_params))
        return {
            "score": loss if math.isfinite(loss) else math.inf,
            "loss": loss,
            "grad_evals": float(self.eval_steps),
        }
