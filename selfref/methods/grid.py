"""Grid search (Bergstra & Bengio 2012, the baseline of section 2): a Cartesian grid.

Every trial trains the task once with one grid point (see :mod:`selfref.methods.trial`).
The number of points per dimension is derived from the budget — the most balanced grid that
fits in ``budget.max_trials`` trials, grown one dimension at a time, fewest points first —
or given. Log dimensions are log-spaced; categorical dimensions always contribute all their
choices. Points sit at the centres of equal cells of each (log) range, so a one-point axis
tries the centre and no point sits on a bound (``endpoints=True`` spans the bounds instead).

The grid is enumerated in a seeded random order by default (``order="shuffled"``), so the
best-so-far curve is not an artefact of which corner the enumeration starts in; the set of
points, and so the final answer when the whole grid fits, does not depend on the order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from selfref.budget import Budget
from selfref.execution import Executor
from selfref.methods.search import TrialSearch
from selfref.methods.study import Proposer
from selfref.methods.trial import TrialFn, run_trial
from selfref.runs import RunDir
from selfref.search_space import CategoricalDim, SearchSpace

__all__ = ["GridSearch", "grid_points", "GridProposer"]

_ORDERS = ("shuffled", "cartesian")


def grid_points(space: SearchSpace, max_trials: int) -> dict[str, int]:
    """Points per dimension of the most balanced grid with at most ``max_trials`` points.

    Starts at one point per numeric dimension (all choices of a categorical one) and adds a
    point to the numeric dimension with the fewest points (ties: the earlier dimension) while
    the grid still fits. Integer dimensions never get more points than they have values.

    Raises:
        ValueError: the categorical dimensions alone need more trials than ``max_trials``.
    """
    n = {d.name: (len(d.choices) if isinstance(d, CategoricalDim) else 1) for d in space.dims}
    total = math.prod(n.values())
    if total > max_trials:
        raise ValueError(
            f"the categorical dimensions alone make a grid of {total} points; the budget "
            f"allows {max_trials} trials"
        )
    numeric = [d for d in space.dims if not isinstance(d, CategoricalDim)]
    while True:
        grown = False
        for d in sorted(numeric, key=lambda d: n[d.name]):  # stable: ties keep space order
            k = n[d.name]
            if k + 1 > d.size:
                continue
            if total // k * (k + 1) <= max_trials:
                n[d.name] = k + 1
                total = total // k * (k + 1)
                grown = True
                break
        if not grown:
            return n


class GridProposer:
    """Trial ``i`` is the ``i``-th point of the (seeded-shuffled or Cartesian) grid."""

    deterministic = True

    def __init__(self, points: list[dict[str, Any]]) -> None:
        self.points = points

    def ask(self, index: int) -> dict[str, Any] | None:
        return dict(self.points[index]) if index < len(self.points) else None

    def tell(self, index: int, hparams: Mapping[str, Any], record: Mapping[str, Any]) -> None:
        pass

    def replay(self, index: int, hparams: Mapping[str, Any], record: Mapping[str, Any]) -> None:
        pass


class GridSearch(TrialSearch):
    """Grid search over a search space, log-spaced where log (Bergstra & Bengio 2012).

    Args:
        points: points per dimension (an int for every numeric dimension, or a mapping by
            name); None derives them from the budget with :func:`grid_points`.
        order: ``"shuffled"`` (seeded permutation of the grid) or ``"cartesian"``.
        endpoints: put the outer grid points on the bounds instead of at cell centres.
        space, workers, executor, run_dir, trial_fn: see
            :class:`~selfref.methods.search.TrialSearch`.

    Raises:
        ValueError: a bad ``order``, or (in ``run``) a given grid larger than the budget.

    Example:
        >>> from selfref.budget import Budget
        >>> from selfref.tasks import make
        >>> res = GridSearch(workers=0).run(make("quadratic"), Budget(400, 50), seed=0)
        >>> res.extra["grid_size"], res.grad_evals
        (8, 400)
    """

    name: ClassVar[str] = "grid"

    def __init__(
        self,
        points: int | Mapping[str, int] | None = None,
        order: str = "shuffled",
        endpoints: bool = False,
        space: SearchSpace | None = None,
        workers: int | None = None,
        executor: Executor | None = None,
        run_dir: RunDir | str | None = None,
        trial_fn: TrialFn = run_trial,
        storage: str | None = None,
    ) -> None:
        super().__init__(
            space=space,
            workers=workers,
            executor=executor,
            run_dir=run_dir,
            trial_fn=trial_fn,
            storage=storage,
        )
        if order not in _ORDERS:
            raise ValueError(f"unknown grid order {order!r}; valid: {', '.join(_ORDERS)}")
        if isinstance(points, int) and points < 1:
            raise ValueError(f"grid points must be >= 1, got {points}")
        self.points = points
        self.order = order
        self.endpoints = endpoints

    def proposer(self, space: SearchSpace, budget: Budget, seed: int) -> Proposer:
        if self.points is None:
            per = grid_points(space, budget.max_trials)
        elif isinstance(self.points, int):
            per = {d.name: self.points for d in space.dims}
        else:
            per = dict(self.points)
        pts = space.grid(per, endpoints=self.endpoints)
        if len(pts) > budget.max_trials:
            raise ValueError(
                f"a grid of {len(pts)} points ({per}) needs {len(pts) * budget.steps_per_trial} "
                f"gradient evaluations; the budget of {budget.grad_evals} allows "
                f"{budget.max_trials} trials"
            )
        if self.order == "shuffled":
            g = torch.Generator().manual_seed(int(seed))
            perm = torch.randperm(len(pts), generator=g).tolist()
            pts = [pts[i] for i in perm]
        self._per = {d.name: len(d.grid(per.get(d.name, 1), self.endpoints)) for d in space.dims}
        return GridProposer(pts)

    def describe(self, proposer: Proposer) -> dict[str, Any]:
        assert isinstance(proposer, GridProposer)
        return {"grid_size": len(proposer.points), "grid_points": self._per, "order": self.order}
