"""Meta-problems: what the one trainer meta-trains (:class:`~selfref.meta.problem.MetaProblem`).

- :class:`LearnedOptimizerProblem` — the self-referential net's modifier on a task family
  (Andrychowicz et al. 2016);
- :class:`TaskDistributionProblem` — one modifier for a distribution of tasks (held-out
  meta-objective; Metz et al. 2020);
- :class:`SequenceProblem` — a sequence learner on ``fewshot-digits``, trained by
  backpropagation through whole sequences (in-context learning, Irie et al. 2022);
- ``toy.py`` — problems with a known answer for the estimators' tests and benchmark
  (influence balancing, Vicol et al. 2021 §5.1; a learning rate on a fixed quadratic).
- :class:`BlackBoxProblem` — an LSTM black-box optimizer on GP samples (Chen et al. 2017).
"""

from selfref.meta.problems.blackbox import BlackBoxConfig, BlackBoxProblem
from selfref.meta.problems.learned_optimizer import EVAL_SEED_BASE, LearnedOptimizerProblem
from selfref.meta.problems.sequence import SequenceProblem
from selfref.meta.problems.task_distribution import TaskDistributionProblem
from selfref.meta.problems.toy import InfluenceBalancing, QuadraticLearningRate

__all__ = [
    "LearnedOptimizerProblem",
    "SequenceProblem",
    "TaskDistributionProblem",
    "BlackBoxProblem",
    "BlackBoxConfig",
    "InfluenceBalancing",
    "QuadraticLearningRate",
    "EVAL_SEED_BASE",
]
