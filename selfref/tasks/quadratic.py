"""Random quadratics f(θ) = ‖Wθ − y‖², the first experiment of Andrychowicz et al. 2016.

"Learning to learn by gradient descent by gradient descent", section 3.1: 10-dimensional
quadratic functions with W (10×10) and y (10) drawn i.i.d. Gaussian; θ0 = 0 by default (the
reference code starts at zero; ``init="gaussian"`` draws θ0 ~ N(0, 1) instead).

The *function* is data: it travels in the batch, so one task object serves any number of
independent functions and ``torch.func.vmap`` maps the loss over stacked functions. Under
``batch(split, step, seed)`` the function is fixed by ``(split, seed)`` — the objective is
deterministic, so ``step`` does not change it — and train/val/test draw from disjoint
streams, so held-out functions are never seen in meta-training. ``num_functions`` > 1 puts a
batch of independent functions in one task (params (m, d), loss summed over functions, so
each function's gradient is exactly its own).

That is the meta-learning view (a split is a family of functions). For hyperparameter
search on one optimization problem (``selfref compare --task quadratic``) pass
``functions="fixed"``: every split and seed then returns the one function drawn from the
task's ``seed``, so the val and test losses are the training objective itself — with
per-split functions they would score θ on a function it was never trained on.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor

from selfref.params import Params
from selfref.tasks.base import SPLIT_SALT, Batch, check_split, mix_seed, resolve_device

__all__ = ["QuadraticTask"]


class QuadraticTask:
    """Batch of ``num_functions`` independent quadratics ‖W_i θ_i − y_i‖² in ``dim`` dimensions.

    Args:
        dim: dimension d of θ (paper: 10).
        num_functions: m independent functions per batch (params shape (m, d)).
        distribution: ``"gaussian"`` (paper) or ``"uniform"`` (U[-1, 1]) for W and y.
        init: ``"zeros"`` (θ0 = 0) or ``"gaussian"`` (θ0 ~ N(0, 1)).
        functions: ``"per_split"`` (default: the function depends on split and seed — the
            meta-learning setting) or ``"fixed"`` (one function for every split and seed,
            drawn from ``seed``: one optimization problem, for hyperparameter search).
        seed: the seed ``evaluate`` uses to pick the split's functions (with
            ``functions="fixed"``: the one function).
        device, dtype: placement of params and batches.

    Example:
        >>> task = QuadraticTask()
        >>> p = task.init_params(torch.Generator().manual_seed(0))
        >>> float(task.loss(p, task.batch("train", 0, seed=0))) > 0
        True
    """

    name: ClassVar[str] = "quadratic"
    description: ClassVar[str] = (
        "10-d random quadratics ||W theta - y||^2 (Andrychowicz et al. 2016)"
    )
    step_invariant: ClassVar[bool] = True  # the function depends on (split, seed) only
    # hyperparameter search tunes one optimization problem: val/test score the trained function
    search_defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({"functions": "fixed"})
    num_classes: int = 0  # a regression objective, no classes

    def __init__(
        self,
        dim: int = 10,
        num_functions: int = 1,
        distribution: str = "gaussian",
        init: str = "zeros",
        functions: str = "per_split",
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if num_functions < 1:
            raise ValueError(f"num_functions must be >= 1, got {num_functions}")
        if distribution not in ("gaussian", "uniform"):
            raise ValueError(f"unknown distribution {distribution!r}; valid: gaussian, uniform")
        if init not in ("zeros", "gaussian"):
            raise ValueError(f"unknown init {init!r}; valid: zeros, gaussian")
        if functions not in ("per_split", "fixed"):
            raise ValueError(f"unknown functions {functions!r}; valid: per_split, fixed")
        self.dim = dim
        self.num_functions = num_functions
        self.distribution = distribution
        self.init = init
        self.functions = functions
        self.seed = seed
        self.device = resolve_device(device)
        self.dtype = dtype
        self.batch_size = 1

    def init_params(self, generator: torch.Generator) -> Params:
        shape = (self.num_functions, self.dim)
        if self.init == "zeros":
            theta = torch.zeros(shape, dtype=self.dtype)
        else:
            theta = torch.randn(shape, generator=generator, dtype=self.dtype)
        return {"theta": theta.to(self.device)}

    def sample_functions(self, generator: torch.Generator, m: int | None = None) -> Batch:
        """Draw ``m`` fresh functions: {"W": (m, d, d), "y": (m, d)}."""
        m = self.num_functions if m is None else m
        d = self.dim
        if self.distribution == "gaussian":
            W = torch.randn(m, d, d, generator=generator, dtype=self.dtype)
            y = torch.randn(m, d, generator=generator, dtype=self.dtype)
        else:
            W = torch.rand(m, d, d, generator=generator, dtype=self.dtype) * 2 - 1
            y = torch.rand(m, d, generator=generator, dtype=self.dtype) * 2 - 1
        return {"W": W.to(self.device), "y": y.to(self.device)}

    def loss(self, params: Params, batch: Batch) -> Tensor:
        theta = params["theta"]  # (m, d)
        r = torch.einsum("mij,mj->mi", batch["W"], theta) - batch["y"]  # (m, d)
        return (r * r).sum()

    def batch(self, split: str, step: int, seed: int) -> Batch:
        check_split(split)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.functions == "fixed":  # one problem: the train function of the task's seed
            split, seed = "train", self.seed
        g = torch.Generator().manual_seed(mix_seed(seed, SPLIT_SALT[split], 0x51AD))
        return self.sample_functions(g)

    @torch.no_grad()
    def evaluate(self, params: Params, split: str) -> dict[str, float]:
        return {"loss": float(self.loss(params, self.batch(split, 0, self.seed)))}

    def num_examples(self, split: str) -> int:
        check_split(split)
        return 1

    def full_batch(self, split: str) -> None:
        """None: no data set; the objective of a split is ``batch(split, 0, seed)``."""
        check_split(split)
        return None
