"""Meta-problems: what the one trainer meta-trains (:class:`~selfref.meta.problem.MetaProblem`).

- :class:`LearnedOptimizerProblem` — the self-referential net's modifier on a task family
  (Andrychowicz et al. 2016);
- :class:`TaskDistributionProblem` — one modifier for a distribution of tasks (held-out
  meta-objective; Metz et al. 2020);
- :class:`SequenceProblem` — a sequence learner on ``fewshot-digits``, trained by
  backpropagation through whole sequences (in-context learning, Irie et al. 2022).
"""

from selfref.meta.problems.learned_optimizer import EVAL_SEED_BASE, LearnedOptimizerProblem
from selfref.meta.problems.sequence import SequenceProblem
from selfref.meta.problems.task_distribution import TaskDistributionProblem

__all__ = [
    "LearnedOptimizerProblem",
    "SequenceProblem",
    "TaskDistributionProblem",
    "EVAL_SEED_BASE",
]
