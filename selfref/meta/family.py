"""Task families for meta-training: many instances of one task, stacked for ``vmap``.

An *instance* of a task is fixed by an integer seed: its initial weights come from
``task.init_params(Generator(seed))`` and its minibatches from ``task.batch(split, t, seed)``.
For the quadratic task (Andrychowicz et al. 2016, section 3.1) the seed selects the function
(W, y); for supervised tasks it selects the initialization and the minibatch order. A
family stacks m instances along a new leading dimension so one ``vmap``-ed step serves all.

Notation: m – instances (task-batch), S – a parameter tensor's shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.func import vmap

from selfref.params import Params
from selfref.tasks.base import Batch, Task, check_split

__all__ = ["TaskFamily", "stack_trees", "index_tree"]


def stack_trees(trees: Sequence[dict]) -> dict:
    """Stack a list of (nested) dicts of tensors along a new leading dim."""
    first = trees[0]
    out: dict = {}
    for k, v in first.items():
        if isinstance(v, dict):
            out[k] = stack_trees([t[k] for t in trees])
        else:
            out[k] = torch.stack([t[k] for t in trees])
    return out


def index_tree(tree: dict, i: int) -> dict:
    """Instance ``i`` of a stacked (nested) dict of tensors."""
    return {k: index_tree(v, i) if isinstance(v, dict) else v[i] for k, v in tree.items()}


class TaskFamily:
    """m instances of ``task`` at once.

    Args:
        task: a task whose loss is pure in (params, batch).

    Example:
        >>> from selfref.tasks import make
        >>> fam = TaskFamily(make("quadratic"))
        >>> fam.init_params([0, 1, 2])["theta"].shape
        torch.Size([3, 1, 10])
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        # Tasks whose batches do not change with the step (a quadratic's function) are
        # fetched once per seed set.
        self.step_invariant = bool(task.step_invariant)
        self._memo: tuple[tuple[str, tuple[int, ...]], Batch] | None = None

    def init_params(self, seeds: Sequence[int]) -> Params:
        """Stacked initial weights {name: (m, *S)}."""
        return stack_trees(
            [self.task.init_params(torch.Generator().manual_seed(int(s))) for s in seeds]
        )

    def batch(self, split: str, step: int, seeds: Sequence[int]) -> Batch:
        """Stacked minibatch ``step`` of every instance: {key: (m, ...)}."""
        check_split(split)
        key = (split, tuple(int(s) for s in seeds))
        if self.step_invariant and self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        out = stack_trees([self.task.batch(split, step, int(s)) for s in seeds])
        if self.step_invariant:
            self._memo = (key, out)
        return out

    def loss(self, params: Params, batch: Batch) -> Tensor:
        """Per-instance loss (m,) of stacked params on a stacked batch."""
        return vmap(self.task.loss)(params, batch)

    def final_loss(self, params: Params, split: str, step: int, seeds: Sequence[int]) -> Tensor:
        """Per-instance loss (m,) used to score a trajectory's end point.

        Tasks with a whole split in memory (``task.full_batch(split)`` is not None): the loss
        over the whole ``split``; others (quadratics): the loss on batch ``step`` of ``split``
        — the exact objective.
        """
        full = self.task.full_batch(split)
        with torch.no_grad():
            if full is not None:
                return vmap(self.task.loss, in_dims=(0, None))(params, full)
            return self.loss(params, self.batch(split, step, seeds))
