"""The *normal* model: the task network whose weights θ the self-referential net modifies.

Schmidhuber (1993), "A neural network that embeds its own meta-levels", splits a
self-referential network by purpose; the normal part does the task. Here it is a thin,
stateless view of a :class:`~selfref.tasks.Task`: initial weights and the task loss, both
pure in ``(params, batch)`` so ``torch.func.vmap`` can map them over many task instances.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfref.params import Params
from selfref.tasks.base import Batch, Task

__all__ = ["NormalModel"]


class NormalModel:
    """The task network θ ↦ loss(θ, batch).

    Args:
        task: the task whose model is trained (its ``loss`` must be pure in params and batch).

    Example:
        >>> from selfref.tasks import make
        >>> normal = NormalModel(make("quadratic"))
        >>> theta = normal.init_params(torch.Generator().manual_seed(0))
        >>> sorted(theta)
        ['theta']
    """

    def __init__(self, task: Task) -> None:
        self.task = task

    def init_params(self, generator: torch.Generator) -> Params:
        """Initial weights θ0 drawn from ``generator``."""
        return self.task.init_params(generator)

    def loss(self, params: Params, batch: Batch) -> Tensor:
        """The task loss at ``params`` on ``batch`` (a scalar)."""
        return self.task.loss(params, batch)
