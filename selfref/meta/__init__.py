"""The meta-gradient loop: unrolled truncated BPTT through self-modification steps.

- ``family.py``: many instances of one task, stacked for ``torch.func.vmap``;
- ``unroll.py``: one differentiable truncation (meta-loss Σ_t w_t Q(θ_t), vmap or loop);
- ``estimators.py``: the estimator interface and :class:`TruncatedBPTT`;
- ``evaluate.py``: held-out rollouts of a learned modifier and of tuned baselines;
- ``trainer.py``: :class:`MetaTrainer` — Adam on φ, clipping, NaN guard, held-out
  checkpoint choice, checkpoints and exact resume.

Follows Andrychowicz et al. 2016, "Learning to learn by gradient descent by gradient
descent", sections 2–3.
"""

from __future__ import annotations

from selfref.meta.estimators import Estimate, Estimator, InnerState, TruncatedBPTT
from selfref.meta.evaluate import (
    DEFAULT_LR_GRID,
    Rollout,
    rollout_baseline,
    rollout_learned,
    tune_baseline,
)
from selfref.meta.family import TaskFamily
from selfref.meta.trainer import (
    CHECKPOINT_FORMAT,
    MetaTrainConfig,
    MetaTrainer,
    MetaTrainResult,
    load_checkpoint,
)
from selfref.meta.unroll import UnrollOutput, unroll

__all__ = [
    "TaskFamily",
    "unroll",
    "UnrollOutput",
    "Estimator",
    "Estimate",
    "InnerState",
    "TruncatedBPTT",
    "Rollout",
    "rollout_learned",
    "rollout_baseline",
    "tune_baseline",
    "DEFAULT_LR_GRID",
    "MetaTrainConfig",
    "MetaTrainer",
    "MetaTrainResult",
    "load_checkpoint",
    "CHECKPOINT_FORMAT",
]
