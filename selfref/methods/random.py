"""Random search (Bergstra & Bengio 2012): independent uniform draws from the search space.

Each trial's point is drawn uniformly in every dimension — log-uniformly where the dimension
is log, as the paper does for scale parameters — from a ``torch.Generator`` seeded by
``(seed, trial index)``. So trial ``i`` of a seed is the same point in any order, on any
worker count and after a resume, and the study runs as many trials as the budget allows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch

from selfref.budget import Budget
from selfref.methods.search import TrialSearch
from selfref.methods.study import Proposer
from selfref.search_space import SearchSpace

__all__ = ["RandomSearch", "RandomProposer", "trial_generator"]


def trial_generator(seed: int, index: int) -> torch.Generator:
    """A generator for trial ``index`` of seed ``seed`` (streams mixed by NumPy's SeedSequence)."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]) & 0x7FFF_FFFF_FFFF_FFFF)


class RandomProposer:
    """Trial ``i`` is ``space.sample(trial_generator(seed, i))``."""

    deterministic = True

    def __init__(self, space: SearchSpace, seed: int) -> None:
        self.space = space
        self.seed = seed

    def ask(self, index: int) -> dict[str, Any] | None:
        return self.space.sample(trial_generator(self.seed, index))

    def tell(self, index: int, hparams: Mapping[str, Any], record: Mapping[str, Any]) -> None:
        pass

    def replay(self, index: int, hparams: Mapping[str, Any], record: Mapping[str, Any]) -> None:
        pass


class RandomSearch(TrialSearch):
    """Random search: seeded uniform draws, log-uniform where log (Bergstra & Bengio 2012).

    Args:
        space, workers, executor, run_dir, trial_fn: see
            :class:`~selfref.methods.search.TrialSearch`.

    Example:
        >>> from selfref.budget import Budget
        >>> from selfref.tasks import make
        >>> res = RandomSearch(workers=0).run(make("quadratic"), Budget(200, 50), seed=0)
        >>> res.extra["trials"], res.grad_evals
        (4, 200)
    """

    name: ClassVar[str] = "random"

    def proposer(self, space: SearchSpace, budget: Budget, seed: int) -> Proposer:
        return RandomProposer(space, seed)
