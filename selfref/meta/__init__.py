"""Meta-training: one loop, pluggable gradient estimators, meta-problems.

- ``problem.py``: the :class:`MetaProblem` protocol (φ and the inner computation it drives)
  and the carry :class:`Inner`;
- ``problems/``: learned optimizers on a task family, sequence learners on fewshot-digits;
- ``estimators/``: one interface, one file per estimator (truncated and full BPTT, ...);
- ``trainer.py``: the one loop — a pure ``init_state``/``train_step`` over a training state
  (which is the checkpoint) and the :class:`MetaTrainer` driver (held-out evaluation,
  keep-best, checkpoints and exact resume, logging, data-parallel ranks);
- ``shards.py``: the meta-batch in shards with their own random streams (φ does not depend
  on the world size); ``distributed.py``: ranks on torch.distributed (torchrun);
- ``family.py``: many instances of one task, stacked for ``torch.func.vmap``;
- ``unroll.py``: one differentiable truncation of the self-modification loop;
- ``evaluate.py``: held-out rollouts of a learned modifier and of tuned baselines.

Follows Andrychowicz et al. 2016, "Learning to learn by gradient descent by gradient
descent", sections 2–3, and google/learned_optimization's split of outer trainers and
gradient estimators.
"""

from __future__ import annotations

from selfref.meta.estimators import (
    ESTIMATORS,
    Estimate,
    GradientEstimator,
    estimator_names,
    make_estimator,
)
from selfref.meta.evaluate import (
    DEFAULT_LR_GRID,
    Rollout,
    rollout_baseline,
    rollout_learned,
    tune_baseline,
)
from selfref.meta.family import TaskFamily
from selfref.meta.problem import Inner, MetaProblem, Truncation, detach_tree
from selfref.meta.problems import LearnedOptimizerProblem, SequenceProblem
from selfref.meta.trainer import (
    CHECKPOINT_FORMAT,
    MetaTrainConfig,
    MetaTrainer,
    MetaTrainResult,
    init_state,
    load_checkpoint,
    train_step,
)
from selfref.meta.unroll import UnrollOutput, unroll

__all__ = [
    "TaskFamily",
    "unroll",
    "UnrollOutput",
    "MetaProblem",
    "Inner",
    "Truncation",
    "detach_tree",
    "LearnedOptimizerProblem",
    "SequenceProblem",
    "GradientEstimator",
    "Estimate",
    "ESTIMATORS",
    "estimator_names",
    "make_estimator",
    "Rollout",
    "rollout_learned",
    "rollout_baseline",
    "tune_baseline",
    "DEFAULT_LR_GRID",
    "MetaTrainConfig",
    "MetaTrainer",
    "MetaTrainResult",
    "init_state",
    "train_step",
    "load_checkpoint",
    "CHECKPOINT_FORMAT",
]
