"""The base of the search methods (grid, random, Optuna): ``Method.run`` as one study.

A search method is a :class:`~selfref.methods.study.Proposer` plus this class: ``run``
builds the proposer and a :class:`~selfref.methods.study.Study` and drives it on an
executor — the one it was given (``selfref compare`` shares one for the whole comparison),
or its own local one with ``workers`` processes (0: in this process), closed at the end.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

from selfref.budget import Budget
from selfref.execution import Executor, make_executor
from selfref.execution.driver import drive
from selfref.execution.optuna_storage import check_storage_url
from selfref.execution.store import open_store
from selfref.logging import Logger
from selfref.methods.base import Result
from selfref.methods.study import Proposer, Study
from selfref.methods.trial import TrialFn, run_trial, warmup
from selfref.runs import RunDir
from selfref.search_space import SearchSpace, default_space
from selfref.tasks import Task

__all__ = ["TrialSearch", "study_executor"]


def study_executor(task: Task, workers: int | None) -> Executor:
    """A local executor for ``task``'s trials (``workers`` processes, 0 = in this process).

    A task that cannot be pickled runs in this process, with a warning.
    """
    if workers != 0:
        try:
            pickle.dumps(task)
        except Exception as e:
            warnings.warn(
                f"task {getattr(task, 'name', task)!r} cannot be pickled for worker processes "
                f"({type(e).__name__}: {e}); running trials in this process instead",
                stacklevel=3,
            )
            workers = 0
    return make_executor(workers=workers, setup=warmup)


class TrialSearch:
    """Base of the search methods: a :class:`Proposer` run as a :class:`Study`.

    Args:
        space: the search space (default :func:`selfref.search_space.default_space`).
        workers: local worker processes when no ``executor`` is given (default: CPU cores;
            0 = in this process).
        executor: a shared :mod:`selfref.execution` executor (left open after ``run``).
        run_dir: where ``trials.jsonl`` lives; finished trials of the study
            ``<name>-s<seed>`` found there are kept, not re-run (resume).
        trial_fn: the picklable top-level trial function ``(task, request) -> record``
            (default :func:`~selfref.methods.trial.run_trial`).
        storage: an Optuna RDB URL every finished trial also goes to, one Optuna study per
            (method, seed); resume then reads the database
            (:mod:`selfref.execution.optuna_storage`).
    """

    name: ClassVar[str] = "search"
    max_in_flight: ClassVar[int | None] = None  # trials at once (None: the executor's slots)
    sync_lag: int | None = None  # Study's synchronous lag (None: results told as they arrive)

    def __init__(
        self,
        space: SearchSpace | None = None,
        workers: int | None = None,
        executor: Executor | None = None,
        run_dir: RunDir | str | None = None,
        trial_fn: TrialFn = run_trial,
        storage: str | None = None,
    ) -> None:
        if space is not None and not isinstance(space, SearchSpace):
            raise ValueError(f"space must be a SearchSpace, got {type(space).__name__}")
        if workers is not None and workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = in-process), got {workers}")
        self.space = space
        self.workers = workers
        self.executor = executor
        self.run_dir = RunDir.open(run_dir) if isinstance(run_dir, str) else run_dir
        self.trial_fn = trial_fn
        if storage is not None:
            check_storage_url(storage)
        self.storage = storage

    def proposer(self, space: SearchSpace, budget: Budget, seed: int) -> Proposer:
        raise NotImplementedError

    def describe(self, proposer: Proposer) -> dict[str, Any]:
        """Method-specific facts for ``Result.extra``."""
        return {}

    def study(
        self,
        task: Task,
        budget: Budget,
        logger: Logger | None,
        seed: int,
        task_ref: Any,
        key_prefix: str = "",
        sync_s: float = 0.0,
    ) -> Study:
        """This method's study of ``task`` (units receive ``task_ref`` for the task; its
        trials.jsonl is fsync'd at most every ``sync_s`` seconds, 0: after every trial; with
        ``storage`` its trials also go to the database)."""
        space = self.space if self.space is not None else default_space(task)
        budget.require_trial()
        name = f"{self.name}-s{seed}"
        store = open_store(self.run_dir, self.storage, name, space, self.name, seed, sync_s)
        return Study(
            name,
            task,
            task_ref,
            space,
            budget,
            seed,
            self.proposer(space, budget, seed),
            store=store,
            logger=logger,
            trial_fn=self.trial_fn,
            key_prefix=key_prefix,
            max_in_flight=self.max_in_flight,
            sync_lag=self.sync_lag,
        )

    def result(self, study: Study, workers: int, extra: Mapping[str, Any] | None = None) -> Result:
        """The Result of a finished study of this method."""
        return study.result(self.name, workers, {**self.describe(study.proposer), **(extra or {})})

    def run(
        self, task: Task, budget: Budget, logger: Logger | None = None, seed: int = 0
    ) -> Result:
        """Search ``space`` on ``task`` within ``budget``; the best trial's metrics come back.

        Raises:
            ValueError: a budget smaller than one trial, a resume that does not match.
        """
        executor = self.executor or study_executor(task, self.workers)
        try:
            study = self.study(task, budget, logger, seed, executor.share(task))
            drive(executor, [study])
        finally:
            if executor is not self.executor:
                executor.close()
        return self.result(study, executor.workers)
