"""Shards of the meta-batch: independent random streams, so φ does not depend on the world size.

Data-parallel meta-training splits the global meta-batch into *shards*, each with its own
counter-based random stream: shard j at meta-step s draws its instances (and ES/PES
perturbations) from ``Generator(seed_of(seed, j, s))``. By default there is one shard per rank
(shard j is rank j, the trainer's stream). With ``MetaTrainConfig.shards`` = k > world size,
each rank runs k / world_size shards one after another through :class:`ShardedEstimator`,
so a run on any world size that divides k draws exactly the same instances and takes the
same meta-steps: 1 rank with ``shards=2`` equals 2 ranks (to rounding: the mean over shards
is summed in a different order only when k > 2).

Each shard's meta-gradient is the mean over its own n / k instances; the rank averages its
shards and the ranks average theirs (all shards are the same size, so this is the mean over
the global meta-batch). Sums run in float64.

Notation: k – shards, n – the global meta-batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from selfref.meta.estimators.base import Estimate, GradientEstimator
from selfref.meta.problem import MetaProblem
from selfref.params import Params

__all__ = ["ShardedEstimator", "mean_float64"]


def mean_float64(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The element-wise mean of same-shape tensors, summed in float64, in the first's dtype."""
    total = tensors[0].double()
    for t in tensors[1:]:
        total = total + t.double()
    return (total / len(tensors)).to(tensors[0].dtype)


class ShardedEstimator:
    """Runs ``base`` on several shards of the meta-batch in one rank, each with its own stream.

    The generator the trainer passes is not used: shard j of meta-step s draws from
    ``Generator(stream_seed(j, s))`` — the stream rank j would use if the shards were spread
    one per rank — and the trajectories started at meta-step t (:meth:`init`) from
    ``stream_seed(j, t - 1)``, as :func:`~selfref.meta.trainer.init_state` (t = 0) and the
    skip path of :func:`~selfref.meta.trainer.train_step` (t = s + 1) seed the rank's own.

    Args:
        base: the estimator of one shard (sized for n / k instances).
        shards: the global indices of this rank's shards.
        stream_seed: (shard, counter) -> seed; the trainer's ``seed_of(seed, ·, ·)``.

    Example:
        >>> from selfref.meta.estimators import make_estimator
        >>> from selfref.meta.trainer import seed_of
        >>> est = ShardedEstimator(make_estimator("tbptt", meta_batch=4), [0, 1],
        ...                        lambda j, s: seed_of(0, j, s))
        >>> est.name
        'tbptt'
    """

    def __init__(
        self,
        base: GradientEstimator,
        shards: Sequence[int],
        stream_seed: Callable[[int, int], int],
    ) -> None:
        if not shards:
            raise ValueError("a rank needs at least one shard")
        self.base = base
        self.name = base.name
        self.shards = list(shards)
        self.stream_seed = stream_seed

    def _gen(self, shard: int, counter: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.stream_seed(shard, counter))

    def init(
        self, problem: MetaProblem, meta_params: Params, generator: torch.Generator, step: int
    ) -> dict[str, Any]:
        return {
            "shards": [
                self.base.init(problem, meta_params, self._gen(j, step - 1), step)
                for j in self.shards
            ]
        }

    def estimate(
        self,
        problem: MetaProblem,
        meta_params: Params,
        state: dict[str, Any],
        generator: torch.Generator,
        horizon: int,
        step: int,
    ) -> Estimate:
        ests = [
            self.base.estimate(problem, meta_params, sub, self._gen(j, step), horizon, step)
            for j, sub in zip(self.shards, state["shards"])
        ]
        grads = {k: mean_float64([e.grads[k] for e in ests]) for k in ests[0].grads}
        keys = set.intersection(*(set(e.metrics) for e in ests))
        metrics = {k: sum(e.metrics[k] for e in ests) / len(ests) for k in sorted(keys)}
        return Estimate(
            grads=grads,
            meta_loss=sum(e.meta_loss for e in ests) / len(ests),
            state={"shards": [e.state for e in ests]},
            grad_evals=sum(e.grad_evals for e in ests),
            metrics=metrics,
        )
